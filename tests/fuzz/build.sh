#!/bin/sh
# Build the fuzz harnesses of the C core under AddressSanitizer and
# UndefinedBehaviorSanitizer (see README.md).
#
#   tests/fuzz/build.sh [OUTDIR]        (default: build/fuzz)
#
# Every harness fuzz_<name>.c is linked with the C core (shmq/native/*.c,
# except the CPython extension fastpath*.c) and fuzz_common.c:
#   OUTDIR/fuzz_<name>            with fuzz_driver.c (seeded mutation loop), any C compiler
#   OUTDIR/fuzz_<name>-libfuzzer  with -fsanitize=fuzzer, when $CC (default clang) supports it
# CC=gcc (or cc) picks the compiler of the driver builds; the first of
# $CC, cc, gcc, clang that can link -fsanitize=address,undefined is used.
set -eu
here=$(cd "$(dirname "$0")" && pwd)
top=$(cd "$here/../.." && pwd)
out=${1:-$top/build/fuzz}
mkdir -p "$out"
san="-fsanitize=address,undefined -fno-sanitize-recover=all -fno-omit-frame-pointer"
flags="-O1 -g -std=gnu11 -Wall -Wextra -Werror -Wno-unused-parameter -fno-strict-aliasing -I$top/shmq/native -I$here"

pick() {
    for c in ${CC:-} cc gcc clang; do
        command -v "$c" >/dev/null 2>&1 || continue
        if echo 'int main(void){return 0;}' | "$c" $san -x c - -o "$out/.probe" 2>/dev/null; then
            echo "$c"; return 0
        fi
    done
    return 1
}
cc=$(pick) || { echo "no C compiler here links -fsanitize=address,undefined" >&2; exit 77; }

core=""
for f in "$top"/shmq/native/*.c; do
    case $(basename "$f") in fastpath*) continue ;; esac
    core="$core $f"
done
# The core is compiled once per build into objects, then linked per harness.
objdir="$out/obj"
mkdir -p "$objdir"
objs=""
for f in $core "$here/fuzz_common.c"; do
    o="$objdir/$(basename "$f" .c).o"
    $cc $flags $san -c "$f" -o "$o"
    objs="$objs $o"
done
$cc $flags $san -c "$here/fuzz_driver.c" -o "$objdir/fuzz_driver.o"
for h in "$here"/fuzz_*.c; do
    name=$(basename "$h" .c)
    case $name in fuzz_common|fuzz_driver) continue ;; esac
    $cc $flags $san "$h" $objs "$objdir/fuzz_driver.o" -o "$out/$name" -lpthread
    echo "built $out/$name ($cc)"
done
lf=${LIBFUZZER_CC:-clang}
if command -v "$lf" >/dev/null 2>&1 &&
   echo 'int LLVMFuzzerTestOneInput(const char *d, long n){return 0;}' |
       "$lf" -fsanitize=fuzzer,address,undefined -x c - -o "$out/.probe" 2>/dev/null; then
    lobjs=""
    for f in $core "$here/fuzz_common.c"; do
        o="$objdir/lf-$(basename "$f" .c).o"
        $lf $flags $san -DSHMQ_LIBFUZZER -fsanitize=fuzzer-no-link -c "$f" -o "$o"
        lobjs="$lobjs $o"
    done
    for h in "$here"/fuzz_*.c; do
        name=$(basename "$h" .c)
        case $name in fuzz_common|fuzz_driver) continue ;; esac
        $lf $flags $san -DSHMQ_LIBFUZZER -fsanitize=fuzzer "$h" $lobjs -o "$out/$name-libfuzzer" -lpthread
        echo "built $out/$name-libfuzzer ($lf, libFuzzer)"
    done
fi
rm -f "$out/.probe"
