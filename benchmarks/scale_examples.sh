#!/usr/bin/env bash
# The examples of docs/how-to/own-data.md and docs/how-to/scale.md, run for real on the bundled
# model (a few steps each: they show the mechanisms, not a result). Usage:
#   bash benchmarks/scale_examples.sh WORKDIR > WORKDIR/examples.log 2>&1
# Needs: pip install -e '.[scale]' (datasets, tensorboard, submitit).
set -u
export TQDM_DISABLE=1
W=$(realpath "${1:?usage: scale_examples.sh WORKDIR}")
mkdir -p "$W" && cd "$W"
DATA=${KOFF_DATA:-$(dirname "$0")/../../shared/data}
FAST="--steps 4 --batch-size 2 --seq-len 64 --no-reference --kv-tokens 4 --lora-rank 4"
show() { echo; echo "\$ $*"; "$@"; echo "[exit $?]"; }

echo "## a Parquet dataset per domain"
python - "$DATA" <<'PY'
import sys
from datasets import Dataset
data = sys.argv[1]
for lang in ("fr", "es"):
    lines = [l.strip() for l in open(f"{data}/text/{lang}/train.txt", encoding="utf-8") if l.strip()]
    Dataset.from_dict({"text": lines}).to_parquet(f"{lang}.parquet")
    print(f"{lang}.parquet: {len(lines)} rows")
PY
show koff decompose --train fr=fr.parquet --train es=es.parquet --test fr="$DATA/text/fr/test.txt" \
    --test es="$DATA/text/es/test.txt" $FAST --report-to tensorboard -o runs/parquet
show koff evaluate runs/parquet --max-tokens 512
echo; echo "## the second run reads the token cache"
show koff decompose --train fr=fr.parquet --train es=es.parquet $FAST --seed 1 -o runs/parquet-again

echo; echo "## the same files, streamed"
show koff decompose --train fr=fr.parquet --train es=es.parquet $FAST --streaming -o runs/streamed

echo; echo "## TensorBoard: the event files read back"
python - <<'PY'
from pathlib import Path
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
for run in sorted(Path("runs/tracking/tensorboard").iterdir()):
    acc = EventAccumulator(str(run)); acc.Reload()
    tags = acc.Tags()["scalars"]
    print(f"{run}: {len(tags)} scalar series, e.g.")
    for tag in [t for t in tags if t in ("loss", "loss/fr", "expected_sparsity", "lr")][:4]:
        ev = acc.Scalars(tag)
        print(f"  {tag:20s} steps {[e.step for e in ev]}  last {ev[-1].value:.4f}")
PY

echo; echo "## SIGTERM, then the same command again"
CMD=(koff decompose --domains en fr --steps 40 --batch-size 2 --seq-len 64 --no-reference --resume auto -o runs/preempted)
echo "\$ ${CMD[*]} &   # then kill -TERM after step 5"
"${CMD[@]}" 2>&1 &
pid=$!
until [ -f runs/preempted.partial/metrics.jsonl ] && [ "$(wc -l < runs/preempted.partial/metrics.jsonl)" -ge 5 ]; do kill -0 $pid || break; sleep 0.5; done
kill -TERM $pid; wait $pid; echo "[exit $?]"
show "${CMD[@]}"
python -c "import json; r=[json.loads(l) for l in open('runs/preempted/metrics.jsonl')]; print(len(r), 'steps in metrics.jsonl, steps', r[0]['step'], '...', r[-1]['step'])"

echo; echo "## a grid as cluster jobs"
cat > grid.yaml <<YAML
name: tiny
results: grid-results
work: grid-runs
base: {domains: [en, fr], target_sparsity: 0.2, reference: false,
       memory: {lora_rank: 4, kv_tokens: 4}, train: {steps: 4, batch_size: 2, seq_len: 64}}
seeds: [0, 1]
eval: {block: 64, max_tokens: 256}
methods: {dense: {kind: dense}, koff: {}}
cluster: {timeout_min: 60, slurm_partition: gpu, gpus_per_node: 1, cpus_per_task: 8, mem_gb: 64}
YAML
show koff compare grid.yaml --commands --checkpoint-every 2
show koff compare grid.yaml --executor local --cluster-param cpus_per_task=1
show koff compare grid.yaml --executor local
ls grid-results/cells
