#!/bin/bash
# Run on the GPU machine from the repository root, with .gpu/ carried (bench/gpu/prepare.sh).
# MiniLM distillation recipe sweep at the CPU step budget, plus one long run.
set -u
export PYTHONPATH=$PWD/.gpu/site:$PWD DTE_CORPUS_FILE=$PWD/.gpu/corpus.json.gz PYTHONUNBUFFERED=1 HOME=/tmp/h
mkdir -p /tmp/h
nvidia-smi -L; nproc; python3 -c "import torch,tokenizers;print(torch.__version__, torch.cuda.is_available(), tokenizers.__version__)"
python3 bench/distil_sweep.py --steps 8000 --recipes layers-cos-1e-3-local --device cuda --eval 2000 --out $OUT/long.json > $OUT/long.log 2>&1 &
LONG=$!
timeout 330 python3 bench/distil_sweep.py --steps 1200 --device cuda --parallel 16 --eval 2000 --out $OUT/sweep.json 2>&1 | tee $OUT/sweep.log
echo "sweep done at $SECONDS s"
# give the long run until ~420 s in total
while kill -0 $LONG 2>/dev/null && [ $SECONDS -lt 420 ]; do sleep 5; done
kill $LONG 2>/dev/null
cat $OUT/long.log | tail -5
nvidia-smi --query-gpu=name,memory.used --format=csv
