#!/usr/bin/env bash
# The GPU check of the memory kernels (issue 13), one command for a machine lent with a GPU for a
# few minutes. From the repository's root:
#
#     tools/gpu_check.sh OUT [PROFILE]
#
# PROFILE is gpu (the default) or smoke, which rehearses every step on a CPU in a few minutes
# (the Triton rows are then skipped, with the reason recorded). In order, each part under its own
# time limit, so that one slow part cannot starve the next, and a failing part does not stop them:
#
#   part       what                                                  H200 estimate   limit
#   tests      CUDA tests of the Triton search and read, the layers'    1.5-2.5 min   170 s
#              kernels, and the benches' Triton rows (compiling each
#              kernel variant once for the GPU is most of it)
#   retrieval  pkm-ref bench retrieval at 2^12, 2^16, 2^20, 2^24 slots       ~1 min    80 s
#   layer      pkm-ref bench layer at 2^12, 2^16, 2^20, 2^22 slots, the   ~1.5 min   110 s
#              layer under torch.compile at 2^20 (~30 s to compile)
#   paper      pkm-ref bench paper: d_model 1024, 12 vs 24 layers, 64 x  1.5-2 min   130 s
#              256 tokens, 6 models (compiled read and Triton at d 1024
#              compile in ~1 min of it)
#
# about 6 minutes in all, 8.2 at most (give the device tool's run timeout_s 600). Each bench runs
# the gpu profile's 3 rounds of 5 timed runs. The estimates come from the earlier H200 runs
# (figures/gpu/reproduce_steps.md: 39 s and 20 s for one round of the torch rows at 7 sizes) and
# the work added; the summary records the real times.
# Needs torch, triton, numpy, pytest, tqdm and matplotlib, all in the GPU image; no corpus package
# (the benches read none) and no install: the package runs from this checkout. OUT receives five
# files, within the lease's eight:
#
#   summary.md       versions, the time and exit status of each part, every goal, the paper table
#   tests.log        the pytest output
#   bench.log        the three benches' output (tables and goals)
#   results.tar.gz   bench_{retrieval,layer,paper}.{json,md,png}: unpack into figures/gpu/
#   environment.txt  nvidia-smi, python, torch and triton versions
#
# CONTRIBUTING.md ("Measuring on a lent GPU") says how to commit what comes back.
set -uo pipefail

out=${1:?usage: tools/gpu_check.sh OUT [PROFILE]}
profile=${2:-gpu}
python=${PYTHON:-python3}
cd "$(dirname "$0")/.."
mkdir -p "$out"
out=$(cd "$out" && pwd)
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 PKM_REF_FIGURES="$work"
summary="$out/summary.md"

{
    nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader 2>&1 || true
    "$python" -c 'import platform, torch; print("python", platform.python_version(), "torch",
torch.__version__, "cuda", torch.version.cuda, "device",
torch.cuda.get_device_name() if torch.cuda.is_available() else "none")'
    "$python" -c 'import triton; print("triton", triton.__version__)' 2>&1
} >"$out/environment.txt"
echo "# GPU check, profile $profile" >"$summary"
echo >>"$summary"
cat "$out/environment.txt" >>"$summary"
echo >>"$summary"

# part NAME LIMIT LOG COMMAND...: run COMMAND under LIMIT seconds, its output into LOG (and the
# terminal); record its time and exit status (124: stopped at the limit) in the summary.
part() {
    local name=$1 limit=$2 log=$3 start status
    shift 3
    start=$(date +%s)
    echo "== $name: $*" | tee -a "$log"
    timeout --kill-after=10 "$limit" "$@" 2>&1 | tee -a "$log"
    status=${PIPESTATUS[0]}
    echo "- $name: exit $status after $(($(date +%s) - start)) s (limit $limit s)" | tee -a "$summary"
}

# Seconds per part, and the sizes: gpu as in the table above; smoke on a CPU, where the tests run
# the kernels in Triton's interpreter (minutes), at the profile's own sizes.
declare -A limits
if [ "$profile" = gpu ]; then
    limits=([tests]=170 [retrieval]=80 [layer]=110 [paper]=130)
    retrieval_sizes=(--sizes 12 16 20 24) layer_sizes=(--sizes 12 16 20 22)
else
    limits=([tests]=900 [retrieval]=300 [layer]=300 [paper]=300)
    retrieval_sizes=() layer_sizes=()
fi

part tests "${limits[tests]}" "$out/tests.log" "$python" -m pytest -p no:cacheprovider -o addopts="" -q -rs \
    tests/test_search_triton.py tests/test_read_triton.py tests/test_memory.py \
    tests/test_memory_kernels.py tests/test_bench.py::test_triton_rows_are_measured_where_the_kernels_run
bench=("$python" -m pkm_ref bench --profile "$profile")
part retrieval "${limits[retrieval]}" "$out/bench.log" "${bench[@]}" retrieval "${retrieval_sizes[@]}"
part layer "${limits[layer]}" "$out/bench.log" "${bench[@]}" layer "${layer_sizes[@]}"
part paper "${limits[paper]}" "$out/bench.log" "${bench[@]}" paper

(cd "$work" && tar -czf "$out/results.tar.gz" bench_*) || echo "- no result files" >>"$summary"
{
    echo
    echo "## Tests"
    echo
    tail -n 3 "$out/tests.log"
    echo
    echo "## Goals"
    echo
    grep '^goal ' "$out/bench.log" | sed 's/^/- /'
    echo
    echo "## Paper width"
    echo
    sed -n '/^| case /,/^$/p' "$work/bench_paper.md" 2>/dev/null
} >>"$summary"
echo
cat "$summary"
