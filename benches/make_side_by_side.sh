#!/usr/bin/env bash
# nanoflow beside GNU make on the same DAG (issue 35): for N stages each written both as
# pipeline.yaml and as a Makefile,
#
#   tree   a binary tree: stage 1 is the root, stage i depends on stage i/2, and one target
#          (`all`) names the leaves, so everything builds;
#   chain  stage i depends on stage i-1, the target is the last one.
#
# Every stage is the trivial make rule: check that its input is there, touch its output
# (`test -e $< && touch $@`; nanoflow: `test -e ${parent}/done && touch $OUT/done`).
# Timed: the first (cold) run from an empty store / no files, the no-op run that finds
# everything made, and `nanoflow status` on the made tree; min and median, in ms, with hyperfine
# when it is installed (`apt-get install hyperfine`), else a bash loop. The last column of the
# chain rows is the cost per stage (cold run / N).
#
#   benches/make_side_by_side.sh [PATH/TO/nanoflow]     # default: target/release/nanoflow
#
# Environment: NS (default "100 1000"), RUNS (timed no-op runs, default 10), COLD_RUNS (default 3),
# NO_HYPERFINE=1 (time with the bash loop even where hyperfine is installed).
set -euo pipefail

root=$(cd "$(dirname "$0")/.." && pwd)
nanoflow=${1:-$root/target/release/nanoflow}
if [[ ! -x $nanoflow ]]; then
    echo "building $nanoflow (cargo build --release --locked --bin nanoflow)" >&2
    (cd "$root" && cargo build --release --locked --bin nanoflow >&2)
fi
nanoflow=$(cd "$(dirname "$nanoflow")" && pwd)/$(basename "$nanoflow")
NS=${NS:-100 1000}
RUNS=${RUNS:-10}
COLD_RUNS=${COLD_RUNS:-3}
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT

# write SHAPE N DIR: DIR/pipeline.yaml and DIR/Makefile for the same DAG.
write() {
    local shape=$1 n=$2 dir=$3 i parent leaves=()
    mkdir -p "$dir"
    {
        echo "stages:"
        for ((i = 1; i <= n; i++)); do
            case $shape in
            tree) parent=$((i / 2)) ;;
            chain) parent=$((i - 1)) ;;
            esac
            echo "  s$i:"
            echo "    kind: command"
            if ((parent == 0)); then
                echo "    run: touch \$OUT/done"
            else
                echo "    run: test -e \${s$parent}/done && touch \$OUT/done"
            fi
        done
        echo "targets:"
        case $shape in
        tree) for ((i = n / 2 + 1; i <= n; i++)); do leaves+=("s$i"); done ;;
        chain) leaves=("s$n") ;;
        esac
        echo "  all: [$(IFS=,; echo "${leaves[*]}")]"
    } >"$dir/pipeline.yaml"
    {
        echo ".PHONY: all"
        echo "all: ${leaves[*]}"
        for ((i = 1; i <= n; i++)); do
            case $shape in
            tree) parent=$((i / 2)) ;;
            chain) parent=$((i - 1)) ;;
            esac
            if ((parent == 0)); then
                printf 's%d:\n\ttouch $@\n' "$i"
            else
                printf 's%d: s%d\n\ttest -e $< && touch $@\n' "$i" "$parent"
            fi
        done
    } >"$dir/Makefile"
}

# time NAME RUNS PREPARE COMMAND: prints "min median" in ms.
time_it() {
    local name=$1 runs=$2 prepare=$3 command=$4
    if [[ -z ${NO_HYPERFINE:-} ]] && command -v hyperfine >/dev/null; then
        hyperfine -N --style none --runs "$runs" --prepare "bash -c '$prepare'" \
            --export-json "$work/$name.json" "$command" >/dev/null 2>&1 || hyperfine --style none --runs "$runs" --prepare "$prepare" \
            --export-json "$work/$name.json" "$command" >/dev/null
        jq -r '.results[0] | "\(.times | min) \(.median)"' "$work/$name.json" | awk '{printf "%.1f %.1f\n", $1 * 1e3, $2 * 1e3}'
    else
        local times=() start end
        for ((run = 0; run < runs; run++)); do
            bash -c "$prepare"
            start=$(date +%s%N)
            bash -c "$command" >/dev/null 2>&1
            end=$(date +%s%N)
            times+=($(((end - start) / 1000)))
        done
        printf '%s\n' "${times[@]}" | sort -n |
            awk '{t[NR]=$1} END {printf "%.1f %.1f\n", t[1]/1000, t[int((NR+1)/2)]/1000}'
    fi
}

row() { # row SHAPE N WHAT TOOL "min median" [per-stage]
    printf '%-6s %5s  %-8s %-9s %10s %10s %s\n' "$@"
}

echo "nanoflow: $nanoflow"
echo "make:     $(make --version | head -1)"
echo "machine:  $(lscpu | sed -n 's/^Model name: *//p'), $(nproc) cores; $(uptime | sed 's/.*load/load/')"
echo
row shape N run tool "min ms" "median ms" "per stage (cold median / N)"
for n in $NS; do
    for shape in tree chain; do
        dir=$work/$shape-$n
        write "$shape" "$n" "$dir"
        cd "$dir"
        read -r min median < <(time_it "$shape-$n-nf-cold" "$COLD_RUNS" "rm -rf $dir/artifacts" "$nanoflow -q run all")
        row "$shape" "$n" cold nanoflow "$min" "$median" "$(awk -v m="$median" -v n="$n" 'BEGIN {printf "%.2f ms", m / n}')"
        read -r min median < <(time_it "$shape-$n-make-cold" "$COLD_RUNS" "rm -f $dir/s[0-9]*" "make -s -C $dir all")
        row "$shape" "$n" cold make "$min" "$median" "$(awk -v m="$median" -v n="$n" 'BEGIN {printf "%.2f ms", m / n}')"
        # Leave both made for the no-op runs.
        "$nanoflow" -q run all >/dev/null
        make -s -C "$dir" all >/dev/null
        read -r min median < <(time_it "$shape-$n-nf-noop" "$RUNS" "true" "$nanoflow -q run all")
        row "$shape" "$n" no-op nanoflow "$min" "$median"
        read -r min median < <(time_it "$shape-$n-make-noop" "$RUNS" "true" "make -s -C $dir all")
        row "$shape" "$n" no-op make "$min" "$median"
        if [[ $shape == tree ]]; then
            read -r min median < <(time_it "$shape-$n-nf-status" "$RUNS" "true" "$nanoflow -q status all")
            row "$shape" "$n" status nanoflow "$min" "$median"
            read -r min median < <(time_it "$shape-$n-make-n" "$RUNS" "true" "make -n -s -C $dir all")
            row "$shape" "$n" "-n" make "$min" "$median"
        fi
        cd "$root"
    done
done
