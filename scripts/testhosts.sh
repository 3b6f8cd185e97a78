#!/usr/bin/env bash
# Test hosts on one machine, for the network tests and benchmarks (root and iproute2 needed).
#
#   testhosts.sh up N [PREFIX [tap]]     N hosts: network namespaces PREFIX-h1..hN with eth0 at
#                                        10.77.0.I/24, cabled by veth pairs to a bridge in its own
#                                        namespace PREFIX-sw (no traffic leaves the machine), and an
#                                        /etc/netns/PREFIX-hI/hosts naming every host h1..hN; with
#                                        "tap", eth0 is a TAP device and scripts/linkemu.py is the
#                                        switch (emulated links where the kernel has no netem)
#   testhosts.sh exec PREFIX I CMD...    run CMD on host I: its network namespace and its own UTS
#                                        and mount namespaces: hostname hI, /etc/hosts naming the
#                                        hosts (exec: the PID is CMD's)
#   testhosts.sh netem PREFIX PROFILE    shape every host's eth0: gigabit (1 Gbit/s, 0.2 ms),
#                                        fast-ethernet (100 Mbit/s, 1 ms), wifi (50 Mbit/s, 4 ms
#                                        +- 2 ms, 0.1% loss) or none
#   testhosts.sh link PREFIX I up|down   plug or unplug host I's cable (its end on the bridge)
#   testhosts.sh down [PREFIX]           kill what runs in the hosts and delete all they were made of
#
# PREFIX defaults to "mdi". Each host's link is shaped on its way out, so a message between two
# hosts crosses one netem (the delay is one way).
set -euo pipefail
cmd=${1:-}
shift || true

hosts_of() { ip netns list | awk '{print $1}' | grep -E "^$1-h[0-9]+$" || true; }

case "$cmd" in
  up)
    n=${1:?usage: testhosts.sh up N [PREFIX [tap]]}
    p=${2:-mdi}
    kind=${3:-veth}
    "$0" down "$p"
    if [ "$kind" = veth ]; then
      ip netns add "$p-sw"
      ip -n "$p-sw" link add br0 type bridge
      ip -n "$p-sw" link set br0 up
      ip -n "$p-sw" link set lo up
    fi
    for i in $(seq 1 "$n"); do
      ns="$p-h$i"
      ip netns add "$ns"
      if [ "$kind" = tap ]; then
        ip -n "$ns" tuntap add dev eth0 mode tap
      else
        ip link add "$p-e$i" type veth peer name "$p-s$i"
        ip link set "$p-e$i" netns "$ns"
        ip link set "$p-s$i" netns "$p-sw"
        ip -n "$ns" link set "$p-e$i" name eth0
        ip -n "$p-sw" link set "$p-s$i" master br0
        ip -n "$p-sw" link set "$p-s$i" up
      fi
      ip -n "$ns" addr add "10.77.0.$i/24" dev eth0
      ip -n "$ns" link set eth0 up
      ip -n "$ns" link set lo up
      mkdir -p "/etc/netns/$ns"
      { echo "127.0.0.1 localhost"; for j in $(seq 1 "$n"); do echo "10.77.0.$j h$j"; done; } > "/etc/netns/$ns/hosts"
    done
    ;;
  exec)
    p=${1:?usage: testhosts.sh exec PREFIX I CMD...}
    i=${2:?usage: testhosts.sh exec PREFIX I CMD...}
    shift 2
    # Not ip netns exec: it mounts the namespace's sysfs over /sys, hiding the cgroup tree slurmd needs.
    exec nsenter --net="/run/netns/$p-h$i" unshare --mount --uts sh -c \
      'mount --bind "/etc/netns/$1/hosts" /etc/hosts && hostname "$0" && shift && exec "$@"' "h$i" "$p-h$i" "$@"
    ;;
  netem)
    p=${1:?usage: testhosts.sh netem PREFIX PROFILE}
    case "${2:?usage: testhosts.sh netem PREFIX PROFILE}" in
      gigabit) shape=(delay 0.2ms rate 1gbit) ;;
      fast-ethernet) shape=(delay 1ms rate 100mbit) ;;
      wifi) shape=(delay 4ms 2ms distribution normal loss 0.1% rate 50mbit) ;;
      none) shape=() ;;
      *) echo "unknown profile $2: gigabit, fast-ethernet, wifi or none" >&2; exit 2 ;;
    esac
    for ns in $(hosts_of "$p"); do
      ip netns exec "$ns" tc qdisc del dev eth0 root 2>/dev/null || true
      [ ${#shape[@]} -gt 0 ] || continue
      if ! ip netns exec "$ns" tc qdisc add dev eth0 root netem limit 100000 "${shape[@]}" 2>/dev/null; then
        echo "this kernel has no netem qdisc (CONFIG_NET_SCH_NETEM): link profiles cannot be emulated here" >&2
        exit 3
      fi
    done
    ;;
  link)
    p=${1:?usage: testhosts.sh link PREFIX I up|down}
    ip -n "$p-sw" link set "$p-s${2:?}" "${3:?}"
    ;;
  down)
    p=${1:-mdi}
    for ns in $(hosts_of "$p") "$p-sw"; do
      ip netns list | awk '{print $1}' | grep -qx -- "$ns" || continue
      pids=$(ip netns pids "$ns" || true)
      [ -n "$pids" ] && kill -9 $pids 2>/dev/null || true
      ip netns del "$ns"
      rm -rf "/etc/netns/$ns"
    done
    ;;
  *)
    sed -n '2,19p' "$0" | sed 's/^# \{0,1\}//'
    [ -z "$cmd" ] || [ "$cmd" = -h ] || [ "$cmd" = --help ] || exit 2
    ;;
esac
