"""The tiny end-to-end demo and what only it and the tests use: synthetic moving-shape clips and the colour
metric (`shapes`), tiny encoders (`tiny_assets`), a tiny precomputed dataset (`tiny_dataset`) and the runner
behind `megawan demo` (`runner`)."""
