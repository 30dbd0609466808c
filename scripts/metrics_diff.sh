#!/usr/bin/env bash
# Print, as markdown, how the workspace's metrics and params differ from a base
# revision, with the report figures: the comment the PR workflow posts. Before
# the metrics table, per-item changes (tunepipe/prdiff.py on metrics/eval_items.json
# at BASE_REV and in the workspace): each model's change in task accuracy, ROUGE-L,
# perplexity and preference accuracy with a paired significance test, and the task
# items that flipped between pass and fail.
#
#   bash scripts/metrics_diff.sh [BASE_REV]      (make diff runs it with no argument)
#
# BASE_REV, when not given:
#   * on a branch that is not main's tip: the merge base with main (or origin/main,
#     master, origin/master), i.e. what the branch changed;
#   * on main's tip with uncommitted changes: HEAD (what the workspace changed);
#   * otherwise HEAD~1 (what the last commit changed).
# Environment: DVC (the dvc command, default `dvc`); PYTHON (default: the python
# beside $DVC, else python); in GitHub Actions the figures link to the run's
# `reports` artifact, elsewhere they are embedded.
set -euo pipefail

DVC=${DVC:-dvc}
PRECISION=4
# A long metrics table (every metric has an interval and a paired test) folds away
# below the per-item section, which says what moved.
FOLD_ROWS=40
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)

if [ -z "${PYTHON:-}" ]; then
  if [[ "$DVC" == */* ]] && [ -x "$(dirname "$DVC")/python" ]; then
    PYTHON="$(dirname "$DVC")/python"
  else
    PYTHON=python
  fi
fi

die() { echo "metrics_diff: $*" >&2; exit 2; }
has_rev() { git rev-parse -q --verify "$1^{commit}" >/dev/null 2>&1; }

default_base() {
  local ref
  for ref in main origin/main master origin/master; do
    if has_rev "$ref"; then
      if [ "$(git rev-parse HEAD)" != "$(git rev-parse "$ref^{commit}")" ]; then
        git merge-base HEAD "$ref"
        return
      fi
      break
    fi
  done
  if [ -n "$(git status --porcelain --untracked-files=no)" ]; then
    echo HEAD
  elif has_rev HEAD~1; then
    echo HEAD~1
  else
    echo HEAD
  fi
}

git rev-parse --is-inside-work-tree >/dev/null 2>&1 || die "not inside a git repository"
has_rev HEAD || die "the repository has no commits yet"
base=${1:-$(default_base)}
has_rev "$base" || die "unknown base revision '$base' (fetch it first, e.g. git fetch origin main)"
short=$(git rev-parse --short "$base^{commit}")

# With nothing changed dvc prints a bare table header (or nothing): say so instead.
section() {
  local title=$1; shift
  local out rows
  out=$("$DVC" "$@") || die "'$DVC $*' failed"
  rows=$(printf '%s\n' "$out" | grep -c '^|' || true)
  if [ "$rows" -lt 3 ]; then
    out="_No changes._"
  elif [ "$rows" -gt "$FOLD_ROWS" ]; then
    out=$(printf '<details><summary>%d changed values</summary>\n\n%s\n\n</details>' "$((rows - 2))" "$out")
  fi
  printf '### %s\n\n%s\n\n' "$title" "$out"
}

# Per-item significance: the code comes from this script's checkout, the files from the
# repository we are in. A failure here must not cost the rest of the comment.
per_item() {
  local out
  if out=$(PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}" "$PYTHON" -m tunepipe.prdiff "$base" --label "$short"); then
    printf '%s\n\n' "$out"
  else
    printf '### Per-item changes\n\n_Per-item comparison failed (%s -m tunepipe.prdiff %s); see the log._\n\n' "$PYTHON" "$base"
  fi
}

printf '## Metrics and params: `%s` (%s) → this run\n\n' "$short" "$base"
per_item
section "Metrics" metrics diff "$base" --md --precision "$PRECISION"
section "Params" params diff "$base" --md

figures=(reports/figures/*.png)
if [ -e "${figures[0]}" ]; then
  printf '### Report figures\n\n'
  if [ -n "${GITHUB_RUN_ID:-}" ]; then
    run_url="${GITHUB_SERVER_URL:-https://github.com}/${GITHUB_REPOSITORY}/actions/runs/${GITHUB_RUN_ID}"
    printf 'The full report (`report.html`, `report.md`) and these figures are in the `reports` artifact of [this run](%s):\n\n' "$run_url"
    for f in "${figures[@]}"; do printf -- '- `%s`\n' "${f#reports/}"; done
  else
    for f in "${figures[@]}"; do
      name=$(basename "$f" .png)
      printf '![%s](%s)\n\n' "${name//_/ }" "$f"
    done
    printf 'Full report: `reports/report.html`.\n'
  fi
fi
