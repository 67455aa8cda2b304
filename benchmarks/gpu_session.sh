#!/usr/bin/env bash
# The GPU measurements still owed, in parts that each fit one 10-minute device call.
#
#     bash benchmarks/gpu_session.sh PART [PART...]     # results under $OUT (default ./gpu-out)
#
# Parts (rough minutes on one H200, model builds and graph captures included):
#   tests   tests/gpu, first half: graphs, data parallel, engine, fp8 (~7: the fp8 kernels compile)
#   tests2  tests/gpu, second half: the rest (the 2-GPU tests skip; the per-stage graphs run with
#           every stage on one GPU) (~5)
#   core    W1 W2 against transformers (issue 21's P = 1 check) (~4)
#   ab      issue 21's P = 1 check as an A/B: W2 (ours only) three times each (AB_PAIRS=N: N), alternating this tree
#           and out/old (carry it: git archive 9d6723d | tar -x -C out/old, the commit before
#           pipeline parallelism) (~7)
#   rows    a batch-1 verification step's K + 1 rows on the linear kernels (the one-row kernel row
#           by row up to 8, the tensor-core kernel above): their GPU tests, the sweep against
#           cuBLAS, then W5 with oracle drafts (alpha 0, 0.7; K 4) with those rows on the one-row
#           kernel (ENCDEC_GEMV_ROWS=8) and on cuBLAS (ENCDEC_GEMV_ROWS=1) (issue 22) (~6)
#   w5ab    the one-row linear kernel's GPU tests, W5 (ours only) twice each, alternating this tree,
#           out/prev (carry it: git archive <commit> | tar -x -C out/prev, the tree to compare
#           against) and this tree without the qkv kernel's K/V store (ENCDEC_GEMV_KV_STORE=0), then W5 with oracle drafts, verification rows on the one-row kernel
#           (ENCDEC_GEMV_ROWS=8) and on cuBLAS (issues 22, 26) (~6)
#   vahead  verification steps launched ahead: tests/gpu/test_speculative_gpu.py and
#           test_cuda_graphs.py, then W5 with oracle
#           drafts (alpha 0, 0.7; K 4) twice each, alternating this tree and out/prev (issue 22) (~9)
#   vprof   where a batch-1 verification step's GPU time goes: benchmarks/ablate_step.py (each piece
#           taken out of the decode and verification graphs), W5 with oracle drafts (alpha 0, 0.7;
#           K 4), then the speculative and graph GPU tests (issue 22) (~8)
#   chains  the one-row kernel's sums in FMA chains: its GPU tests, ab_linear.py against out/prev
#           (carry it: the tree before), W5 with oracle drafts alternating the two trees, then
#           ablate_step.py (issue 22) (~8)
#   widen   the one-row kernel's shift-widened bfloat16: gemv and norm GPU tests, W5 with oracle
#           drafts alternating with out/prev, the norm-warps and one-segment ablations (issue 22) (~6)
#   whole   steps launched ahead on one-piece graphs (batch <= 8) against their five segments
#           (ENCDEC_GRAPH_WHOLE_AHEAD=0): the graph and speculative GPU tests, W5 with oracle drafts
#           (plain, alpha 0, 0.7; K 4) twice each (AB_PAIRS=N: N), alternating, then the gemv and
#           norm GPU tests (issues 22, 26) (~5)
#   abprof  issue 21's P = 1 check kernel by kernel: profile_step.py W2 (512 sequences) in this tree
#           and in out/old (carry it, as for ab): which kernels' GPU time differs (~4)
#   fp8     W1 ours only: bf16 (the default), then --kv-dtype fp8 with absorbed rows on the Gluon
#           kernel (--cross absorbed) and with per-layer K/V (fp8's default) (issue 26) (~5)
#   fp8text the paged kernel on an fp8 pool against bf16 (sweep_kernels.py --only fp8; SWEEP_QUICK=1:
#           default tiles only), W2 ours in bf16 and fp8, W2 in fp8 in out/prev (if carried: the tree
#           before), the fp8 GPU tests (~8)
#   fp8ab   the paged kernel on an fp8 pool against out/prev (carry it: the tree before): the fp8 GPU
#           tests, then sweep_kernels.py --only fp8 --quick in each tree (AB_PAIRS=N: N times, alternating) (~4)
#   beamx   a request's beams as one cross-attention entry: the beam and graph GPU tests, W3 (ours
#           only) alternating this tree and out/prev (AB_PAIRS=N: N pairs, default 2), then where
#           W3's step goes (profile_step.py) (~8)
#   w3seqs  W3 (ours only) at --max-num-seqs 512, 1024 and 2048, then transformers at batch 128 and
#           256 (whether more requests in flight amortise W3's host-bound beam step) (~8)
#   hostvar what moves W3's host-bound run between runs: the beam and graph GPU tests, then
#           benchmarks/repeat_run.py W3 (one engine; default, one torch thread, the main thread
#           pinned, the collector off, in turn; REPEAT_ROUNDS=N rounds, default 4) and W2 (~6)
#   seeds   adaptive K's misses by the sequence's record and the oracle averaged over seeds: the beam,
#           graph and speculative GPU tests, W5 with oracle drafts (alpha 0, 0.7; K 4) twice in this
#           tree and once in out/prev (carry it: the tree before), then hostvar's W3 runs (~9)
#   seqs2k  2048 sequences a step: W2 and W4 (ours only) at --max-num-seqs 2048, then W3 at 2048
#           against transformers at batch 256 (~9)
#   s24     the twenty-fourth session in one call: the beam, graph and speculative GPU tests, W5
#           with oracle drafts in this tree and in out/prev, W3 at 2048 sequences against
#           transformers at 256, then repeat_run.py W3 if time is left (~10)
#   s25     issue 22 on whichever card comes: W5 with oracle drafts (alpha 0, 0.7; K 4; the plain
#           reference now as many runs as seeds) twice, then on an H200 W1 with oracle drafts (alpha
#           0, 0.7), on an H100 repeat_run.py W3 (one torch thread against the default) (~9)
#   kernels the absorbed cross-attention sweep, bf16 and the three fp8 forms of the Gluon kernel (~4)
#   speed   W3 W4 W5 against transformers (issue 26's targets), W3 again with no step launched
#           ahead (beam steps choosing on the host: the A/B of the device's choice), then where
#           W3's step goes (profile_step.py: host against GPU time per step) (~8)
#   spec    W5 and W1 with oracle drafts, alpha 0 and 0.7, K 4, --profile (issue 22), then a W5
#           verification graph's kernels against a decode graph's (profile_step.py --oracle) (~8)
#   spec2   W1 at alpha 0.7 with verification's cross-attention on the Triton kernel, W1's sweep
#           with per-layer cross K/V (--cross kv: the paged kernel reads them once for K + 1
#           tokens), then with two micro-batches (~10)
#   w1spec  W1 plain (absorbed rows) against speculation (per-layer K/V), oracle alpha 0 and 0.7,
#           K 4, in one run; then alpha 0.7 with two micro-batches (issue 22) (~7)
#   short   decode attention's GPU tests, ab with two pairs, W5 oracle with its verification rows
#           on the one-row kernel (~9)
#   check   the GPU tests of the latest changes: image-to-text, speculative (~3)
#   models  W7 W8 W9 against transformers, at full scale (issues 24, 25) (~8)
#   w9      benchmarks/profile_w9.py: where W9's time goes (~3)
#   beamk   a beam step launched ahead in four kernels (encdec_kernels/beams.py): their GPU tests and
#           the beam-ahead ones, W3 against transformers, W3 (ours only) twice each alternating this
#           tree and out/prev (carry it: the tree before), then where W3's step goes (issue 26) (~9)
#   trt     T1 T2 at batch 32/64/128 against transformers (issue 26) (~4)
#   pp2     2 GPUs: tests/gpu/test_pipeline_gpu.py, W1 and W4 with -pp 2 against one device
#           (issue 28) (~6)
#
# Every command runs under its own time limit and the part goes on when one fails; each writes
# a log and a JSON named <device>-<what>-<date>-<commit>.json, ready for benchmarks/results/.
# Where a wheel folder .whl/ is present (soundfile, librosa's pieces: the GPU machine lacks them,
# see /work/.library/device/README.md) it is installed into /tmp/site first.
set -u
OUT=${OUT:-$PWD/gpu-out}
mkdir -p "$OUT"
if [ -d .whl ] && ! python3 -c "import soundfile" 2>/dev/null; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
    export PYTHONPATH=/tmp/site:$PWD
fi
export PYTHONPATH=${PYTHONPATH:-$PWD}
encdec=(python3 -m encdec_cli)
device=$(python3 -c "import torch; n = torch.cuda.get_device_name(0).lower(); print(next((k for k in ('h200', 'h100', 'a100', 'l40s') if k in n), n.split()[-1]))" 2>/dev/null || echo cpu)
commit=${COMMIT:-$(git rev-parse --short HEAD 2>/dev/null || echo nogit)}  # COMMIT=...: the device copy's .git may lag
commit=${commit//[^A-Za-z0-9._-]/-}  # the device tool returns files named in these characters only
day=$(date -u +%F)
name() { echo "$OUT/$device-$1-$day-$commit"; }
step() {  # step LIMIT_S WHAT CMD...: run CMD with a time limit, its output in WHAT.log
    local limit=$1 what=$2
    shift 2
    echo "== $what: $*" | tee -a "$OUT/session.log"
    local t0=$SECONDS
    timeout --signal=INT --kill-after=20 "$limit" "$@" >"$(name "$what").log" 2>&1
    local rc=$?
    echo "   rc $rc, $((SECONDS - t0)) s" | tee -a "$OUT/session.log"
    tail -n 25 "$(name "$what").log"
}
w5_spec() {  # w5_spec WHAT ROWS: W5 with oracle drafts (alpha 0, 0.7; K 4), up to ROWS rows on the
    # one-row linear kernel (a verification step's 5 rows: 1 puts them on cuBLAS)
    step 120 "W5-speculative-$1" env ENCDEC_GEMV_ROWS="$2" "${encdec[@]}" bench W5 --baseline none \
        --speculative oracle --oracle-alpha 0,0.7 --oracle-k 4 --out "$(name "W5-speculative-$1").json"
}
w5_spec_ab() {  # w5_spec_ab NEW PREV: w5_spec twice each, alternating this tree (NEW-i) and out/prev (PREV-i)
    for i in 1 2; do
        w5_spec "$1-$i" 8
        (cd out/prev && w5_spec "$2-$i" 8)
    done
}
w3_ab() {  # W3 (ours only) AB_PAIRS times (default 2) alternating this tree and out/prev, then
    # where W3's step goes (profile_step.py)
    for i in $(seq "${AB_PAIRS:-2}"); do
        step 80 W3-ab-new-$i "${encdec[@]}" bench W3 --baseline none --out "$(name W3-ab-new-$i).json"
        (cd out/prev && step 80 W3-ab-prev-$i "${encdec[@]}" bench W3 --baseline none \
            --out "$(name W3-ab-prev-$i).json")
    done
    step 100 profile-W3 python3 benchmarks/profile_step.py W3 --max-num-seqs 512 --out "$(name profile-W3).json"
}
{ nvidia-smi -L; python3 -c "import torch, triton, transformers; print(torch.__version__, triton.__version__, transformers.__version__)"; } >"$OUT/device.txt" 2>&1

for part in "$@"; do
    case $part in
    tests)
        step 540 gpu-tests python3 -m pytest -q -m gpu tests/gpu/test_cuda_graphs.py \
            tests/gpu/test_data_parallel_gpu.py tests/gpu/test_engine_gpu.py tests/gpu/test_fp8_gpu.py \
            -p no:cacheprovider --junitxml="$(name gpu-tests).xml" ;;
    tests2)
        step 480 gpu-tests2 python3 -m pytest -q -m gpu tests/gpu --ignore=tests/gpu/test_cuda_graphs.py \
            --ignore=tests/gpu/test_data_parallel_gpu.py --ignore=tests/gpu/test_engine_gpu.py \
            --ignore=tests/gpu/test_fp8_gpu.py -p no:cacheprovider --junitxml="$(name gpu-tests2).xml" ;;
    core)
        step 240 W1-W2 "${encdec[@]}" bench W1 W2 --out "$(name W1-W2).json" ;;
    ab)
        for i in $(seq "${AB_PAIRS:-3}"); do
            step 80 W2-ab-new-$i "${encdec[@]}" bench W2 --baseline none --out "$(name W2-ab-new-$i).json"
            (cd out/old && step 80 W2-ab-old-$i "${encdec[@]}" bench W2 --baseline none \
                --out "$(name W2-ab-old-$i).json")
        done
        grep -h "^W2" "$OUT"/*W2-ab-*.log ;;
    rows)
        step 150 gpu-tests-gemv python3 -m pytest -q -m gpu tests/gpu/test_kernels_gpu.py -k gemv -p no:cacheprovider
        step 150 sweep-rows python3 benchmarks/sweep_kernels.py --only rows --out "$(name sweep-rows).json"
        w5_spec gemv 8
        w5_spec cublas 1 ;;
    w5ab)
        step 150 gpu-tests-gemv python3 -m pytest -q -m gpu tests/gpu/test_kernels_gpu.py -k gemv -p no:cacheprovider
        for i in 1 2; do
            step 60 W5-ab-new-$i "${encdec[@]}" bench W5 --baseline none --out "$(name W5-ab-new-$i).json"
            (cd out/prev && step 60 W5-ab-prev-$i "${encdec[@]}" bench W5 --baseline none \
                --out "$(name W5-ab-prev-$i).json")
            step 60 W5-ab-nokv-$i env ENCDEC_GEMV_KV_STORE=0 "${encdec[@]}" bench W5 --baseline none \
                --out "$(name W5-ab-nokv-$i).json"
        done
        w5_spec gemv 8
        w5_spec cublas 1
        grep -h "^W5\|oracle" "$OUT"/*W5-*.log ;;
    vahead)  # verification steps launched ahead (issue 22): their GPU tests, then W5 with oracle
        # drafts alternating this tree and out/prev (carry it: the tree before them)
        step 300 gpu-tests-speculative python3 -m pytest -q -m gpu tests/gpu/test_speculative_gpu.py \
            tests/gpu/test_cuda_graphs.py -p no:cacheprovider
        w5_spec_ab ahead prev
        grep -h "^W5\|oracle" "$OUT"/*W5-*.log ;;
    vprof)  # where a batch-1 verification step's GPU time goes (issue 22): each piece taken out
        # of the decode and verification graphs in turn (ablate_step.py), W5 with oracle drafts,
        # then the speculative and graph GPU tests
        step 200 ablate-W5 python3 benchmarks/ablate_step.py --out "$(name ablate-W5).json"
        w5_spec vprof 8
        step 200 gpu-tests-speculative python3 -m pytest -q -m gpu tests/gpu/test_speculative_gpu.py \
            tests/gpu/test_cuda_graphs.py -p no:cacheprovider
        grep -h "^W5\|oracle\|^queries" "$OUT"/*W5-*.log ;;
    chains)  # the one-row kernel's products summed in FMA chains (issue 22): its GPU tests,
        # ab_linear.py here and in out/prev (carry it: the tree before), W5 with oracle drafts
        # alternating the two trees, then the ablation of this tree's steps
        step 150 gpu-tests-gemv python3 -m pytest -q -m gpu tests/gpu/test_kernels_gpu.py -k gemv -p no:cacheprovider
        step 60 ab-linear-new python3 benchmarks/ab_linear.py
        (cd out/prev && PYTHONPATH=. step 60 ab-linear-prev python3 benchmarks/ab_linear.py)
        w5_spec_ab chains prev
        step 150 ablate-W5 python3 benchmarks/ablate_step.py --out "$(name ablate-W5).json"
        grep -h "^W5\|oracle\|^queries" "$OUT"/*W5-*.log ;;
    widen)  # the one-row kernel's FMA chains and shift-widened bfloat16 (issue 22): the gemv and
        # norm GPU tests, W5 with oracle drafts alternating this tree and out/prev (carry it: the
        # tree before), then the norm-warps and one-segment ablations
        step 150 gpu-tests-gemv python3 -m pytest -q -m gpu tests/gpu/test_kernels_gpu.py -k "gemv or norm" \
            -p no:cacheprovider
        w5_spec_ab widen before-widen
        step 150 ablate-W5 python3 benchmarks/ablate_step.py \
            --only no-norm,one-row,norm-warps-4,norm-warps-2,norm-warps-1,one-segment --out "$(name ablate-W5).json"
        grep -h "passed\|failed\|^W5\|oracle\|^queries" "$OUT"/*.log ;;
    whole)  # steps launched ahead on one-piece graphs (W5's steps all are: the next graph's launch
        # overlaps the GPU's step) against five segments (each cut stops PDL's overlap)
        step 200 gpu-tests-whole python3 -m pytest -q -m gpu tests/gpu/test_cuda_graphs.py \
            tests/gpu/test_speculative_gpu.py -p no:cacheprovider
        for i in $(seq "${AB_PAIRS:-2}"); do
            ENCDEC_GRAPH_WHOLE_AHEAD=0 w5_spec "segments-$i" 8
            ENCDEC_GRAPH_WHOLE_AHEAD=8 w5_spec "whole-$i" 8
        done
        step 150 gpu-tests-gemv python3 -m pytest -q -m gpu tests/gpu/test_kernels_gpu.py -k "gemv or norm" \
            -p no:cacheprovider
        grep -h "passed\|failed\|^W5\|oracle" "$OUT"/*.log ;;
    abprof)
        step 150 profile-W2-new python3 benchmarks/profile_step.py W2 --max-num-seqs 512 --rows 40 \
            --out "$(name profile-W2-new).json"
        (cd out/old && step 150 profile-W2-old python3 benchmarks/profile_step.py W2 --max-num-seqs 512 \
            --rows 40 --out "$(name profile-W2-old).json") ;;
    fp8)
        step 90 W1-bf16 "${encdec[@]}" bench W1 --baseline none --out "$(name W1-bf16).json"
        step 90 W1-fp8-absorbed "${encdec[@]}" bench W1 --baseline none --kv-dtype fp8 --cross absorbed \
            --out "$(name W1-fp8-absorbed).json"
        step 90 W1-fp8-kv "${encdec[@]}" bench W1 --baseline none --kv-dtype fp8 --cross kv --out "$(name W1-fp8-kv).json" ;;
    fp8text)
        step 200 sweep-fp8 python3 benchmarks/sweep_kernels.py --only fp8 ${SWEEP_QUICK:+--quick} --out "$(name sweep-fp8).json"
        step 100 W2-bf16 "${encdec[@]}" bench W2 --baseline none --out "$(name W2-bf16).json"
        step 100 W2-fp8 "${encdec[@]}" bench W2 --baseline none --kv-dtype fp8 --out "$(name W2-fp8).json"
        if [ -d out/prev ]; then  # the tree before (carry out/prev)
            (cd out/prev && step 100 W2-fp8-prev "${encdec[@]}" bench W2 --baseline none --kv-dtype fp8 \
                --out "$(name W2-fp8-prev).json")
        fi
        step 200 gpu-tests-fp8 python3 -m pytest -q -m gpu tests/gpu/test_fp8_gpu.py -k "not hopper" \
            -p no:cacheprovider
        grep -h "passed\|failed\|^W2\|bf16 \|fp8 bnNone\|token-major" "$OUT"/*.log ;;
    fp8ab)
        step 240 gpu-tests-fp8 python3 -m pytest -q -m gpu tests/gpu/test_fp8_gpu.py -k "not hopper" \
            -p no:cacheprovider
        for i in $(seq "${AB_PAIRS:-1}"); do
            step 100 sweep-fp8-new-$i python3 benchmarks/sweep_kernels.py --only fp8 --quick \
                --out "$(name sweep-fp8-new-$i).json"
            (cd out/prev && step 100 sweep-fp8-prev-$i python3 benchmarks/sweep_kernels.py --only fp8 --quick \
                --out "$(name sweep-fp8-prev-$i).json")
        done
        grep -h "passed\|failed\|bf16 \|fp8 bnNone\|token-major" "$OUT"/*.log ;;
    beamx)
        step 240 gpu-tests-beams python3 -m pytest -q -m gpu tests/gpu/test_beam_gpu.py tests/gpu/test_cuda_graphs.py \
            -p no:cacheprovider
        w3_ab
        grep -h "passed\|failed\|^W3" "$OUT"/*.log ;;
    w3seqs)
        for seqs in 512 1024 2048; do
            step 120 W3-seqs-$seqs "${encdec[@]}" bench W3 --baseline none --max-num-seqs $seqs \
                --out "$(name W3-seqs-$seqs).json"
        done
        step 200 W3-baseline "${encdec[@]}" bench W3 --baseline-batch 128 --baseline-batch 256 --max-num-seqs 1024 \
            --out "$(name W3-baseline).json"
        grep -h "W3 \|tok/s" "$OUT"/*W3*.log ;;
    hostvar)
        step 240 gpu-tests-beams python3 -m pytest -q -m gpu tests/gpu/test_beam_gpu.py tests/gpu/test_cuda_graphs.py \
            -p no:cacheprovider
        step 200 repeat-W3 python3 benchmarks/repeat_run.py W3 --rounds "${REPEAT_ROUNDS:-4}" \
            --out "$(name repeat-W3).json"
        step 150 repeat-W2 python3 benchmarks/repeat_run.py W2 --rounds 2 --variants default,threads1,pin \
            --out "$(name repeat-W2).json"
        grep -h "passed\|failed\|round\|median\|first run" "$OUT"/*.log ;;
    seeds)
        step 300 gpu-tests-seeds python3 -m pytest -q -m gpu tests/gpu/test_beam_gpu.py tests/gpu/test_cuda_graphs.py \
            tests/gpu/test_speculative_gpu.py -p no:cacheprovider
        w5_spec seeds-1 8
        (cd out/prev && w5_spec prev 8)
        w5_spec seeds-2 8
        step 150 repeat-W3 python3 benchmarks/repeat_run.py W3 --rounds "${REPEAT_ROUNDS:-3}" \
            --out "$(name repeat-W3).json"
        grep -h "passed\|failed\|oracle\|W5 \|round\|median\|first run" "$OUT"/*.log ;;
    seqs2k)
        for w in W2 W4; do
            step 120 $w-seqs-2048 "${encdec[@]}" bench $w --baseline none --max-num-seqs 2048 \
                --out "$(name $w-seqs-2048).json"
        done
        step 280 W3-seqs-2048-hf "${encdec[@]}" bench W3 --baseline-batch 256 --max-num-seqs 2048 \
            --out "$(name W3-seqs-2048-hf).json"
        grep -h "W[234] \|tok/s" "$OUT"/*seqs*.log ;;
    s24)
        step 200 gpu-tests-s24 python3 -m pytest -q -m gpu tests/gpu/test_beam_gpu.py tests/gpu/test_cuda_graphs.py \
            tests/gpu/test_speculative_gpu.py -p no:cacheprovider -x
        w5_spec seeds-1 8
        (cd out/prev && w5_spec prev 8)
        step 200 W3-seqs-2048-hf "${encdec[@]}" bench W3 --baseline-batch 256 --max-num-seqs 2048 \
            --out "$(name W3-seqs-2048-hf).json"
        step 100 repeat-W3 python3 benchmarks/repeat_run.py W3 --rounds 2 --out "$(name repeat-W3).json"
        grep -h "passed\|failed\|oracle\|W[35] \|round\|median\|first run" "$OUT"/*.log ;;
    kernels)
        step 100 sweep-shared-kv python3 benchmarks/sweep_shared_kv.py --quick
        for form in ring producer registers; do
            step 60 sweep-shared-kv-fp8-$form python3 benchmarks/sweep_shared_kv.py --quick --fp8 $form
        done ;;
    beamk)
        step 200 gpu-tests-beams python3 -m pytest -q -m gpu tests/gpu/test_kernels_gpu.py tests/gpu/test_beam_gpu.py \
            -k "beam or ngram" -p no:cacheprovider
        step 420 W3 "${encdec[@]}" bench W3 --out "$(name W3).json"
        w3_ab
        grep -h "passed\|failed\|^W3" "$OUT"/*.log ;;
    speed)
        step 300 W3-W4-W5 "${encdec[@]}" bench W3 W4 W5 --out "$(name W3-W4-W5).json"
        step 90 W3-no-lookahead "${encdec[@]}" bench W3 --baseline none --no-lookahead --out "$(name W3-no-lookahead).json"
        step 120 profile-W3 python3 benchmarks/profile_step.py W3 --max-num-seqs 512 --out "$(name profile-W3).json" ;;
    spec)
        step 330 W5-W1-speculative-oracle "${encdec[@]}" bench W5 W1 --baseline none --speculative oracle \
            --oracle-alpha 0,0.7 --oracle-k 4 --profile --out "$(name W5-W1-speculative-oracle).json"
        # a W5 verification graph's kernels against a decode graph's: where its extra time goes
        step 150 profile-W5-verify python3 benchmarks/profile_step.py W5 --oracle 0.7:4 --max-num-seqs 1 \
            --out "$(name profile-W5-verify).json" ;;
    spec2)
        # verification's K + 1 tokens a request on the Triton absorbed kernel (rows read once a
        # query group) instead of the Hopper one (once a token): issue 22's W1 lever
        step 200 W1-speculative-triton-multi-query env ENCDEC_GLUON_MULTI_QUERY=0 "${encdec[@]}" bench W1 \
            --baseline none --speculative oracle:0.7:4 --profile --out "$(name W1-speculative-triton-mq).json"
        # per-layer cross K/V: the paged kernel reads a request's K/V once for its K + 1 tokens
        step 200 W1-speculative-kv "${encdec[@]}" bench W1 --baseline none --cross kv --speculative oracle \
            --oracle-alpha 0,0.7 --oracle-k 4 --out "$(name W1-speculative-kv).json"
        step 200 W1-speculative-oracle-mb2 "${encdec[@]}" bench W1 --baseline none --speculative oracle \
            --oracle-alpha 0,0.7 --oracle-k 4 --micro-batches 2 --out "$(name W1-speculative-oracle-mb2).json" ;;
    s25)
        w5_spec s25-1 8
        w5_spec s25-2 8
        if [ "$device" = h200 ]; then
            step 300 W1-speculative "${encdec[@]}" bench W1 --baseline none --speculative oracle \
                --oracle-alpha 0,0.7 --oracle-k 4 --out "$(name W1-speculative).json"
        else
            step 240 repeat-W3 python3 benchmarks/repeat_run.py W3 --rounds 5 --variants default,threads1 \
                --out "$(name repeat-W3).json"
        fi
        grep -h "^W\|oracle\|alpha\|round\|median" "$OUT"/*.log | head -40 ;;
    w1spec)
        # the comparison issue 22's W1 target names: plain decoding in the default layout (absorbed
        # rows) against speculation (per-layer K/V, runner.absorb_by_default), one process run;
        # then speculation with two micro-batches (a cohort's acceptance and drafting on the host
        # while the other's step runs)
        step 240 W1-speculative-auto "${encdec[@]}" bench W1 --baseline none --speculative oracle \
            --oracle-alpha 0,0.7 --oracle-k 4 --out "$(name W1-speculative-auto).json"
        step 200 W1-speculative-mb2 "${encdec[@]}" bench W1 --baseline none --speculative oracle \
            --oracle-alpha 0.7 --oracle-k 4 --micro-batches 2 --out "$(name W1-speculative-mb2).json" ;;
    short)
        # one call when little device time is left: decode attention's GPU tests, issue 21's A/B
        # (two pairs), W5 with oracle drafts, its verification rows on the one-row kernel
        step 120 gpu-tests-decode python3 -m pytest -q -m gpu tests/gpu/test_kernels_gpu.py \
            -k "decode or split_kv" -p no:cacheprovider
        AB_PAIRS=2 bash "$0" ab
        w5_spec gemv 8 ;;
    check)
        step 200 gpu-check python3 -m pytest -q -m gpu tests/gpu/test_image_to_text_gpu.py \
            tests/gpu/test_speculative_gpu.py -p no:cacheprovider ;;
    models)
        step 500 W7-W8-W9 "${encdec[@]}" bench W7 W8 W9 --out "$(name W7-W8-W9).json" ;;
    w9)
        step 150 profile-W9 python3 benchmarks/profile_w9.py ;;
    trt)
        step 300 T1-T2 "${encdec[@]}" bench T1 T2 --out "$(name T1-T2).json" ;;
    pp2)
        step 240 pp2-tests python3 -m pytest -q -m gpu tests/gpu/test_pipeline_gpu.py -p no:cacheprovider
        step 300 W1-W4-pp2 "${encdec[@]}" bench W1 W4 --baseline none -pp 2 --out "$(name W1-W4-pp2).json"
        step 200 W1-W4-pp1 "${encdec[@]}" bench W1 W4 --baseline none --out "$(name W1-W4-pp1).json" ;;
    *)
        echo "unknown part $part (tests tests2 core ab rows whole abprof fp8 fp8text kernels speed spec spec2 w1spec short check models w9 trt pp2)" >&2
        exit 2 ;;
    esac
done
