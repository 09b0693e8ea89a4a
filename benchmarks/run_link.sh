#!/usr/bin/env bash
# Run a benchmark script under torchrun over a rate-limited link, in private network namespaces.
#
# One "host" (default): a namespace whose loopback is capped with a token bucket filter; the
# ranks share that one capped link, so every byte a rank sends queues behind the other's.
# Two "hosts" (--hosts 2): two namespaces joined by a veth pair, each end capped on egress, one
# torchrun per namespace (--nnodes 2) with GLOO_SOCKET_IFNAME naming its end: a full-duplex
# link per direction, like two machines on one switch. See DEVELOPERS.md.
#
# Needs root (ip netns, tc). Everything created is deleted on exit, also on failure.
#
#   bash benchmarks/run_link.sh --rate 1gbit -- benchmarks/throughput.py
#   bash benchmarks/run_link.sh --rate 1gbit --hosts 2 -- benchmarks/throughput.py
#   bash benchmarks/run_link.sh --rate none -- benchmarks/round_cost.py   # uncapped, same setup
set -euo pipefail

rate=1gbit
hosts=1
nproc=2
port=29533
while [[ $# -gt 0 ]]; do
  case "$1" in
    --rate) rate="$2"; shift 2 ;;
    --hosts) hosts="$2"; shift 2 ;;
    --nproc) nproc="$2"; shift 2 ;;
    --port) port="$2"; shift 2 ;;
    --) shift; break ;;
    *) echo "usage: $0 [--rate 1gbit|none] [--hosts 1|2] [--nproc N] -- script.py [args]" >&2; exit 2 ;;
  esac
done
[[ $# -ge 1 ]] || { echo "$0: no script given (after --)" >&2; exit 2; }
if [[ $(id -u) -ne 0 ]]; then echo "$0: needs root for ip netns and tc" >&2; exit 1; fi

cd "$(dirname "$0")/.."
tag="lsgd$$"
namespaces=()
cleanup() {
  for ns in "${namespaces[@]}"; do ip netns del "$ns" 2>/dev/null || true; done
}
trap cleanup EXIT INT TERM

cap() {  # cap NS DEV: limit DEV's egress inside NS to $rate
  [[ "$rate" == none ]] && return 0
  # The burst must exceed the device's MTU (64 KiB on loopback) or large frames never pass
  # and gloo times out.
  ip netns exec "$1" tc qdisc add dev "$2" root tbf rate "$rate" burst 1mb latency 500ms
}

link_note="$rate"
[[ "$rate" == none ]] && link_note="uncapped"
if [[ "$hosts" == 1 ]]; then
  ns="${tag}"
  ip netns add "$ns"; namespaces+=("$ns")
  ip netns exec "$ns" ip link set lo up
  cap "$ns" lo
  ip netns exec "$ns" torchrun --nnodes 1 --nproc_per_node "$nproc" \
    --master_addr 127.0.0.1 --master_port "$port" \
    "$@" --link "one loopback shared by both ranks, $link_note (tc tbf)"
elif [[ "$hosts" == 2 ]]; then
  (( nproc % 2 == 0 )) || { echo "$0: --nproc must be even with --hosts 2" >&2; exit 2; }
  a="${tag}a"; b="${tag}b"
  ip netns add "$a"; namespaces+=("$a")
  ip netns add "$b"; namespaces+=("$b")
  ip link add "${tag}va" netns "$a" type veth peer name "${tag}vb" netns "$b"
  ip netns exec "$a" ip addr add 10.77.0.1/24 dev "${tag}va"
  ip netns exec "$b" ip addr add 10.77.0.2/24 dev "${tag}vb"
  for side in "$a:${tag}va" "$b:${tag}vb"; do
    ip netns exec "${side%%:*}" ip link set lo up
    ip netns exec "${side%%:*}" ip link set "${side#*:}" up
    cap "${side%%:*}" "${side#*:}"
  done
  # Both "hosts" share this machine's cores: split them, as one host would between its ranks.
  threads=$(( $(nproc) / nproc )); (( threads >= 1 )) || threads=1
  per_host=$(( nproc / 2 ))
  pids=()
  for node in 0 1; do
    if [[ $node == 0 ]]; then ns="$a"; dev="${tag}va"; else ns="$b"; dev="${tag}vb"; fi
    # torchrun sets OMP_NUM_THREADS=1 only for several ranks per node; set it for one too.
    ip netns exec "$ns" env GLOO_SOCKET_IFNAME="$dev" LSGD_BENCH_THREADS="$threads" \
      OMP_NUM_THREADS="$threads" \
      torchrun --nnodes 2 --node_rank "$node" --nproc_per_node "$per_host" \
      --master_addr 10.77.0.1 --master_port "$port" \
      "$@" --link "two namespaces, a veth pair, $link_note each way (tc tbf)" &
    pids+=($!)
  done
  status=0
  for pid in "${pids[@]}"; do wait "$pid" || status=$?; done
  exit "$status"
else
  echo "$0: --hosts must be 1 or 2" >&2; exit 2
fi
