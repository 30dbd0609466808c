#!/usr/bin/env bash
# Print, as markdown, how the workspace's metrics and params differ from a base
# revision, with the report figures: the comment the PR workflow posts.
#
#   bash scripts/metrics_diff.sh [BASE_REV]      (make diff runs it with no argument)
#
# BASE_REV, when not given:
#   * on a branch that is not main's tip: the merge base with main (or origin/main,
#     master, origin/master), i.e. what the branch changed;
#   * on main's tip with uncommitted changes: HEAD (what the workspace changed);
#   * otherwise HEAD~1 (what the last commit changed).
# Environment: DVC (the dvc command, default `dvc`); in GitHub Actions the
# figures link to the run's `reports` artifact, elsewhere they are embedded.
set -euo pipefail

DVC=${DVC:-dvc}
PRECISION=4

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
  local out
  out=$("$DVC" "$@") || die "'$DVC $*' failed"
  if [ "$(printf '%s\n' "$out" | grep -c '^|')" -lt 3 ]; then
    out="_No changes._"
  fi
  printf '### %s\n\n%s\n\n' "$title" "$out"
}

printf '## Metrics and params: `%s` (%s) → this run\n\n' "$short" "$base"
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
