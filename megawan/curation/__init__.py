"""Curation: raw clips in, a report of what is wrong with each and a manifest of the good scenes out
(tools/curate.py; docs/curation.md).

    frames.py      one PyAV pass: every frame small, a few key frames full size
    scenes.py      shot cuts (PySceneDetect's ContentDetector)
    quality.py     black borders (the letterbox crop), exposure, blur
    motion.py      Farneback optical flow: motion, camera vs objects, shake -> static / shaky / camera / good
    duplicates.py  perceptual hashes of key frames, banded search, clusters, the one clip kept of each
    scorers.py     user scorers (aesthetic, OCR, watermark, NSFW models) named by dotted path; TextArea example
    decide.py      one clip's measures and its reasons
    runner.py      ranks, per-rank part files, resume, the global duplicates pass, report and manifest
    report.py      report.html: histograms with thresholds, thumbnails per reason

Above megawan.data (it reads manifests and decodes with data's helpers), below training.
"""
