#!/usr/bin/env bash
# `make profile`: instructions per cache hit, counted by callgrind (repeatable to a fraction of a
# percent, unlike timings on a shared virtual machine), through the issuance core and through the
# caller service. Builds examples/hit_loop.rs with the `profiling` profile (release + symbols).
#
# Valgrind's virtual CPU has no SHA extensions, so sha2 runs its portable code under callgrind,
# where the hardware runs SHA-NI: the "without SHA-256" column leaves those instructions out.
# Set PROFILE_KEEP=DIR to keep the callgrind files for callgrind_annotate.
set -euo pipefail
cd "$(dirname "$0")/.."
command -v valgrind >/dev/null || { echo "profile: valgrind is missing (apt-get install -y valgrind)" >&2; exit 2; }
n=${PROFILE_HITS:-20000}
out=${PROFILE_KEEP:-$(mktemp -d /tmp/token-broker-profile.XXXXXX)}
[[ -n ${PROFILE_KEEP:-} ]] || trap 'rm -rf "$out"' EXIT
mkdir -p "$out"
cargo build --locked --profile profiling --example hit_loop
bin=target/profiling/examples/hit_loop

# instructions of one run
count() {
    local file=$out/callgrind.$1.$2
    valgrind --tool=callgrind --callgrind-out-file="$file" "$bin" "$1" "$2" >/dev/null 2>&1
    callgrind_annotate "$file" | awk '/PROGRAM TOTALS/ {gsub(",", "", $1); print $1}'
}

# instructions per iteration of a mode: (count at n - count at 0) / n
declare -A per
for what in core service requests key secret; do
    per[$what]=$((($(count "$what" "$n") - $(count "$what" 0)) / n))
done
service=$((per[service] - per[requests]))
printf '%-9s %18s %18s\n' path 'instructions/hit' 'without SHA-256'
printf '%-9s %18d %18d\n' core "${per[core]}" $((per[core] - per[key]))
printf '%-9s %18d %18d\n' service "$service" $((service - per[key] - per[secret]))
echo "(service: request building, ${per[requests]}/hit, subtracted; SHA-256 under valgrind:" \
    "cache key ${per[key]}, caller secret ${per[secret]} per hit; callgrind files in $out)"
