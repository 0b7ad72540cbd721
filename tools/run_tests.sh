#!/usr/bin/env bash
# Install what the tests need (CPU torch first, so that no other pin pulls a CUDA build) and run them.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}

# Optional: Slurm (slurm-wlm + munge) for tests/test_slurm.py, which starts a one-node cluster on localhost.
# Only where it is missing, as root with apt-get, and never fatal: without it that test skips with the reason.
# MEGAWAN_SLURM_NO_INSTALL=1 skips this step (and stops the test from trying apt-get itself). Where Slurm is
# there and we are root, MEGAWAN_REQUIRE_SLURM=1 makes a cluster that does not start a failure, not a skip.
slurm_missing() {
    local p
    for p in sbatch srun squeue scontrol scancel sinfo slurmctld slurmd munged; do
        PATH="$PATH:/usr/sbin:/sbin" command -v "$p" >/dev/null 2>&1 || return 0
    done
    return 1
}
if [ -z "${MEGAWAN_SLURM_NO_INSTALL:-}" ] && slurm_missing; then
    if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
        echo "run_tests: installing slurm-wlm and munge (apt-get) for tests/test_slurm.py"
        apt_log=$(mktemp)
        if ! (export DEBIAN_FRONTEND=noninteractive
              timeout 900 apt-get update -qq &&
              timeout 900 apt-get install -y -qq --no-install-recommends -o DPkg::Lock::Timeout=120 slurm-wlm munge
             ) >"$apt_log" 2>&1; then
            echo "run_tests: apt-get could not install slurm-wlm / munge (tests/test_slurm.py will skip):" >&2
            tail -n 20 "$apt_log" >&2
        fi
        rm -f "$apt_log"
    else
        echo "run_tests: no Slurm, and installing it needs root and apt-get: tests/test_slurm.py will skip"
    fi
    export MEGAWAN_SLURM_NO_INSTALL=1  # tried once; the test does not try again
fi
if [ "$(id -u)" = 0 ] && ! slurm_missing; then
    export MEGAWAN_REQUIRE_SLURM=1  # installed and root: the Slurm test must run, not skip
fi
# Optional: Chromium and its WebDriver for tests/test_serve.py (the `megawan serve` page in a headless browser),
# installed as Slurm is: only where missing, as root with apt-get (Debian's packages), and never fatal: without
# them that test skips with the reason. Where they are there and we are root, MEGAWAN_REQUIRE_BROWSER=1 makes the
# test fail instead of skip.
browser_missing() {
    { command -v chromium || command -v chromium-browser; } >/dev/null 2>&1 || return 0
    command -v chromedriver >/dev/null 2>&1 && return 1
    return 0
}
if browser_missing; then
    if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
        echo "run_tests: installing chromium and chromium-driver (apt-get) for tests/test_serve.py"
        apt_log=$(mktemp)
        if ! (export DEBIAN_FRONTEND=noninteractive
              timeout 900 apt-get update -qq &&
              timeout 900 apt-get install -y -qq --no-install-recommends -o DPkg::Lock::Timeout=120 chromium \
                  chromium-driver
             ) >"$apt_log" 2>&1; then
            echo "run_tests: apt-get could not install chromium / chromium-driver (tests/test_serve.py will skip):" >&2
            tail -n 20 "$apt_log" >&2
        fi
        rm -f "$apt_log"
    else
        echo "run_tests: no chromium / chromedriver, and installing them needs root and apt-get:" \
             "tests/test_serve.py will skip"
    fi
fi
if [ "$(id -u)" = 0 ] && ! browser_missing; then
    export MEGAWAN_REQUIRE_BROWSER=1  # installed and root: the web-page test must run, not skip
fi
# tests/test_slurm_multihost.py builds its hosts from network namespaces: where this machine can make one, the
# test must run (a sandbox or container without them makes it skip, naming the reason).
probe_ns="mw19-$$-probe"
if [ "$(id -u)" = 0 ] && command -v ip >/dev/null 2>&1 && ip netns add "$probe_ns" >/dev/null 2>&1; then
    ip netns del "$probe_ns"
    export MEGAWAN_REQUIRE_NETNS=1
fi

"$PY" -m pip install --quiet --disable-pip-version-check "torch==2.13.0"
"$PY" -m pip install --quiet --disable-pip-version-check -e ".[test]"
"$PY" -m pytest -q -p no:cacheprovider "$@"
