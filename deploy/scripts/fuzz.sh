#!/usr/bin/env bash
# Runs chunkd's libFuzzer targets (tests/fuzz/*_fuzz.cc), built with ASan+UBSan in build-asan/.
#
#   deploy/scripts/fuzz.sh TARGET [SECONDS]   one target (e.g. key_fuzz), 600 s by default
#   deploy/scripts/fuzz.sh all [SECONDS]      every target, one after the other (CI: 20 s each)
#   deploy/scripts/fuzz.sh list               the targets
#
# Each run starts from the committed seeds (tests/fuzz/corpus/TARGET/, replayed first, so the
# crash inputs kept there are regression tests) and adds what it finds to
# build-asan/fuzz-corpus/TARGET/ (not committed). A crash stops the run, leaves the input in
# build-asan/fuzz-artifacts/ and fails; add the input to the target's seeds with the fix.
# Prints the executions each target ran.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
dir="$root/build-asan"
what="${1:-}"
seconds="${2:-600}"
mapfile -t all < <(cd "$root/tests/fuzz" && ls -- *_fuzz.cc | sed 's/\.cc$//')
case "$what" in
  "") echo "usage: $0 TARGET|all|list [SECONDS]" >&2; exit 2 ;;
  list) printf '%s\n' "${all[@]}"; exit 0 ;;
  all) targets=("${all[@]}") ;;
  *)
    if [ ! -f "$root/tests/fuzz/$what.cc" ]; then
      echo "fuzz.sh: no target $what (fuzz.sh list)" >&2
      exit 2
    fi
    targets=("$what") ;;
esac

"$root/deploy/scripts/sanitize.sh" asan --build-only "${targets[@]}"
# Any sanitizer report is a crash; leaks too (checked at the end of each input's run).
export ASAN_OPTIONS="detect_leaks=1:allocator_may_return_null=0"
export UBSAN_OPTIONS="halt_on_error=1:print_stacktrace=1:suppressions=$root/tests/sanitizers/ubsan.supp"
mkdir -p "$dir/fuzz-artifacts"
status=0
for target in "${targets[@]}"; do
  corpus="$dir/fuzz-corpus/$target"
  seeds="$root/tests/fuzz/corpus/$target"
  mkdir -p "$corpus" "$seeds"
  log="$dir/fuzz-artifacts/$target.log"
  if "$dir/tests/fuzz/$target" -max_total_time="$seconds" -print_final_stats=1 -timeout=10 \
      -rss_limit_mb=2048 -artifact_prefix="$dir/fuzz-artifacts/$target-" \
      "$corpus" "$seeds" >"$log" 2>&1; then
    result=clean
  else
    result="FAILED (see $log)"
    status=1
    grep -E "ERROR|SUMMARY|Test unit written" "$log" | head -n 5 || true
  fi
  runs=$(sed -n 's/^stat::number_of_executed_units: *//p' "$log" | tail -n 1)
  printf '%-20s %12s executions in %ss: %s\n' "$target" "${runs:-?}" "$seconds" "$result"
done
exit $status
