# Sourced by the device-side scripts (on_device.sh, users_check.sh), from the
# repository's root on the GPU machine, after `source .gpu/stage.sh env`.
# Files persist under /tmp/jetspec while the machine stays warm.
W=/tmp/jetspec
mkdir -p "$W"
# A legacy editable install (no package-dir mapping) would miss the kernels.
[ -e vllm_jetspec/kernels ] || ln -s ../kernels vllm_jetspec/kernels
# The repository itself (cwd) and the carried GGUF readers.
export JETSPEC_CACHE_DIR=${JETSPEC_CACHE_DIR:-$W/cache} PYTHONPATH=$PWD:/tmp/jsite:${PYTHONPATH:-}
# The plugin's entry point, visible to every process through PYTHONPATH
# (the image's pip install -e . did not register it: 2026-11-24).
di=/tmp/jsite/vllm_jetspec-0.0.0.dist-info
mkdir -p "$di"
printf 'Metadata-Version: 2.1\nName: vllm-jetspec\nVersion: 0.0.0\n' > "$di/METADATA"
printf '[vllm.general_plugins]\njetspec = vllm_jetspec:register\n' > "$di/entry_points.txt"
