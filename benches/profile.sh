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

# total and SHA-256 instructions of one run
count() {
    local file=$out/callgrind.$1.$2
    valgrind --tool=callgrind --callgrind-out-file="$file" "$bin" "$1" "$2" >/dev/null 2>&1
    local total sha
    total=$(callgrind_annotate "$file" | awk '/PROGRAM TOTALS/ {gsub(",", "", $1); print $1}')
    sha=$(callgrind_annotate --threshold=100 "$file" |
        awk '/:sha2::sha256::soft::compress( |$)/ {gsub(",", "", $1); s += $1} END {print s + 0}')
    echo "$total $sha"
}

printf '%-9s %22s %22s\n' path 'instructions/hit' 'without SHA-256'
for what in core service requests; do
    read -r t0 s0 < <(count "$what" 0)
    read -r t1 s1 < <(count "$what" "$n")
    per=$(((t1 - t0) / n))
    sha=$(((s1 - s0) / n))
    case $what in
        requests) req=$per; req_sha=$sha ;;
        *) eval "${what}_per=$per ${what}_sha=$sha" ;;
    esac
done
printf '%-9s %22d %22d\n' core "$core_per" $((core_per - core_sha))
printf '%-9s %22d %22d   (request building, %d, subtracted)\n' service $((service_per - req)) \
    $((service_per - service_sha - req + req_sha)) "$req"
echo "(callgrind files in $out)"
