#!/usr/bin/env bash
# Fails when a tracked C++ file differs from what clang-format makes of it (.clang-format:
# Google's style at 100 columns, includes sorted and grouped), naming the files and the first
# lines that differ. Run by test.sh (and so by CI) before the build. To fix the tree:
#   git ls-files '*.cc' '*.h' '*.cu' | xargs clang-format-14 -i
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
cd "$root"
format="$(command -v clang-format-14 || command -v clang-format || true)"
if [ -z "$format" ]; then
  echo "check-format: clang-format-14 is missing (deploy/scripts/install-deps.sh all installs it)" >&2
  exit 1
fi
mapfile -t files < <(git ls-files '*.cc' '*.h' '*.cu' '*.cuh')
bad=()
for f in "${files[@]}"; do
  if ! "$format" --dry-run --Werror "$f" >/dev/null 2>&1; then bad+=("$f"); fi
done
if [ "${#bad[@]}" -gt 0 ]; then
  echo "check-format: ${#bad[@]} C++ file(s) are not formatted with clang-format (.clang-format):" >&2
  for f in "${bad[@]}"; do
    echo "  $f" >&2
    diff -u "$f" <("$format" "$f") | sed -n '3,12p' >&2 || true
  done
  echo "fix: git ls-files '*.cc' '*.h' '*.cu' | xargs $(basename "$format") -i" >&2
  exit 1
fi
echo "check-format: ${#files[@]} C++ files formatted"
