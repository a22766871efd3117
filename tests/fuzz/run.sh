#!/bin/sh
# A longer fuzz run: build (tests/fuzz/build.sh), then run every harness (or
# the ones named) for SECONDS each, replaying and extending its corpus.
#
#   tests/fuzz/run.sh [SECONDS [HARNESS...]]     (default 300 s; harnesses: batch frames log pstate unblock)
#
# Inputs that crash are saved in build/fuzz/crashes/; once the bug is fixed,
# copy each into tests/fuzz/corpus/<harness>/ under a name that says what it
# found. With libFuzzer (clang), the -libfuzzer binaries run instead, with
# the harness's seeds plus the corpus. SEED=n picks the mutation seed.
set -eu
here=$(cd "$(dirname "$0")" && pwd)
top=$(cd "$here/../.." && pwd)
out=$top/build/fuzz
secs=${1:-300}
[ $# -gt 0 ] && shift
"$here/build.sh" "$out" >/dev/null
names=${*:-$(cd "$here" && ls fuzz_*.c | sed -e 's/^fuzz_//' -e 's/\.c$//' | grep -v -e '^common$' -e '^driver$')}
mkdir -p "$out/crashes"
status=0
for h in $names; do
    if [ -x "$out/fuzz_$h-libfuzzer" ]; then
        "$out/fuzz_$h" --write-seeds "$out/seeds-$h"
        "$out/fuzz_$h-libfuzzer" -max_total_time="$secs" -artifact_prefix="$out/crashes/$h-" \
            "$out/seeds-$h" "$here/corpus/$h" || status=1
    else
        "$out/fuzz_$h" --seconds "$secs" --seed "${SEED:-$(date +%s)}" --crash-dir "$out/crashes" \
            "$here/corpus/$h" || status=1
    fi
done
exit $status
