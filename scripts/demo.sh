#!/usr/bin/env bash
# make demo: copy examples/demo into its own git repository (as a team adopting the tool
# would have it), deploy it to the local Docker engine with `inv deploy --env=development`,
# and show that it answers.
set -euo pipefail
REPO=$(cd "$(dirname "$0")/.." && pwd)
DEMO=${1:-$REPO/.demo}
INV="$REPO/.venv/bin/inv"

mkdir -p "$DEMO"
# Copy the example (secrets included: they are git-ignored, never committed).
cp -a "$REPO/examples/demo/." "$DEMO/"
cd "$DEMO"
if [ ! -d .git ]; then
  git init --quiet
  git config user.email "demo@togather.invalid"
  git config user.name "togather demo"
fi
git add -A
git commit --quiet -m "demo: $(date -u +%Y-%m-%dT%H:%M:%SZ)" || true

"$INV" deploy --env=development
url=$("$INV" config.show --env=development --json | python3 -c 'import json,sys; print(json.load(sys.stdin)["public_url"])')
echo
echo "The demo is live at $url"
echo "  curl -s $url/version"
curl -fsS "$url/version"
echo
