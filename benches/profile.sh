#!/usr/bin/env bash
# `make profile`: instructions per cache hit, counted by callgrind (repeatable to a fraction of a
# percent, unlike timings on a shared virtual machine), through the issuance core, through the
# caller service with a bearer secret, and through the caller service with a Kubernetes
# service-account token. Builds examples/hit_loop.rs with the `profiling` profile (release +
# symbols).
#
# `make test-instructions` (part of `make test`) runs it with --check: it fails when a figure
# exceeds its budget in benches/instructions.budget, or when a service-account hit costs more
# than 10 % over a secret one. A count of instructions, not a timing: it repeats on any machine
# of the same architecture, loaded or not.
#
# Valgrind's virtual CPU has no SHA extensions, so sha2 runs its portable code under callgrind,
# where the hardware runs SHA-NI: the figures leave the SHA-256 work out (the cache key, the
# digest of the caller's secret or token), measured alone and subtracted.
# Set PROFILE_KEEP=DIR to keep the callgrind files for callgrind_annotate.
set -euo pipefail
cd "$(dirname "$0")/.."
check=0
[[ ${1:-} == --check ]] && check=1
budget_file=benches/instructions.budget
command -v valgrind >/dev/null || { echo "profile: valgrind is missing (apt-get install -y valgrind)" >&2; exit 2; }
if ((check)) && [[ $(uname -m) != x86_64 ]]; then
    # The budget is in x86-64 instructions; another architecture counts other instructions.
    echo "profile: the instruction budget is for x86_64, this is $(uname -m): not checked"
    exit 0
fi
n=${PROFILE_HITS:-20000}
out=${PROFILE_KEEP:-$(mktemp -d /tmp/token-broker-profile.XXXXXX)}
[[ -n ${PROFILE_KEEP:-} ]] || trap 'rm -rf "$out"' EXIT
mkdir -p "$out"
cargo build --locked --profile profiling --example hit_loop
bin=target/profiling/examples/hit_loop

# Instructions of one run: the program's total, as callgrind_annotate prints it.
count() {
    local file=$out/callgrind.$1.$2
    valgrind --tool=callgrind --callgrind-out-file="$file" "$bin" "$1" "$2" >/dev/null 2>&1 ||
        { echo "profile: hit_loop $1 $2 failed under valgrind" >&2; exit 1; }
    callgrind_annotate "$file" 2>/dev/null | awk '/PROGRAM TOTALS/ {gsub(",", "", $1); print $1}'
}

# Instructions per iteration of a mode: (count at n - count at 0) / n.
declare -A per
for what in core service requests service-account token-requests key secret token; do
    per[$what]=$((($(count "$what" "$n") - $(count "$what" 0)) / n))
done
declare -A got
got[core]=$((per[core] - per[key]))
got[service]=$((per[service] - per[requests] - per[key] - per[secret]))
got[service-account]=$((per[service-account] - per[token-requests] - per[key] - per[token]))

printf '%-16s %18s\n' path 'instructions/hit'
for path in core service service-account; do
    printf '%-16s %18d\n' "$path" "${got[$path]}"
done
echo "(SHA-256 left out: cache key ${per[key]}, caller secret ${per[secret]}, service-account" \
    "token ${per[token]} per hit under valgrind; building the requests subtracted:" \
    "${per[requests]} and ${per[token-requests]}; callgrind files in $out)"
((check)) || exit 0

failed=0
while read -r path budget; do
    [[ -z $path || $path == \#* ]] && continue
    measured=${got[$path]:-}
    [[ -n $measured ]] || { echo "profile: $budget_file names an unknown path: $path" >&2; exit 2; }
    if ((measured > budget)); then
        echo "FAIL $path: $measured instructions per hit, over its budget of $budget ($budget_file)"
        failed=1
    else
        echo "ok   $path: $measured instructions per hit, budget $budget"
    fi
done <"$budget_file"
# A caller that sends a service-account token: at most 10 % over one that sends a secret.
limit=$((got[service] * 110 / 100))
if ((got[service-account] > limit)); then
    echo "FAIL service-account: ${got[service-account]} instructions per hit, over 110 % of a secret's (${got[service]})"
    failed=1
else
    echo "ok   service-account: within 110 % of a secret's hit (${got[service-account]} <= $limit)"
fi
exit $failed
