#!/bin/bash
# Run on the GPU machine from the repository root, with .gpu/ carried (bench/gpu/prepare.sh).
# the paired matrix at the CPU budget (800 steps) and at 3x (2400 steps), and a long
# MiniLM distillation with a learning curve. One CPU thread per process (16 processes share 16 cores).
set -u
export PYTHONPATH=$PWD/.gpu/site:$PWD DTE_CORPUS_FILE=$PWD/.gpu/corpus.json.gz PYTHONUNBUFFERED=1 HOME=/tmp/h OMP_NUM_THREADS=1
mkdir -p /tmp/h /tmp/logs
TOK=.gpu/paired-data/tokenizer.json
python3 bench/distil_sweep.py --steps 6000 --recipes layers-cos-5e-4 --device cuda --eval 2000 --eval-every 1000 --threads 1 --out /tmp/logs/minilm-long.json > /tmp/logs/minilm-long.log 2>&1 &
for steps in 800 2400; do for m in std nd2nb2 nd2nb4 nd4nb2 nd4nb4; do
  python3 -m detransformer_edge.cli train-lm --out /tmp/p$steps --only $m --steps $steps --device cuda --threads 1 --tokenizer $TOK --no-weights > /tmp/logs/p$steps-$m.log 2>&1 &
done; done
T0=$SECONDS
while [ $(jobs -r | wc -l) -gt 0 ] && [ $((SECONDS - T0)) -lt 270 ]; do sleep 5; done
echo "waited $((SECONDS - T0)) s; still running: $(jobs -r | wc -l)"
kill $(jobs -p) 2>/dev/null
for steps in 800 2400; do python3 -m detransformer_edge.cli train-lm --out /tmp/p$steps --report-only --tokenizer $TOK 2>&1 | tail -9; done
tail -3 /tmp/logs/minilm-long.log
# results only: checkpoints of interrupted runs would push the archive over the 16 MiB limit
find /tmp/p800 /tmp/p2400 /tmp/logs \( -name "*.json" -o -name "*.md" -o -name "*.log" \) -print0 | tar czf $OUT/results.tgz --null -T - 2>/dev/null
ls -la $OUT
