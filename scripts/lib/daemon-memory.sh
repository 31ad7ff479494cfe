# daemon-memory.sh: what scripts/rss-idle-devices and scripts/many-vbds measure of a
# running `xenblkd serve`, sourced by both (bash).
#
#   snapshot PID FILE     memory snapshot into FILE (`key value` lines, kB unless the key
#                         says otherwise), FILE.smaps (a copy) and FILE.top (mappings by
#                         Rss); uses $TOP (default 12) for nothing but the caller's listing
#   get FILE KEY          a value of a snapshot (0 when absent)
#   own_kb FILE           "daemon own" of a snapshot: VmRSS - guest memory - grant tables
#   idle_cpu PID SECS N   the process's CPU time over SECS s, % of a core, and per device
#   report TITLE FROM TO COUNT SNAPSHOT...
#                         one line per metric: each snapshot, the delta FROM -> TO, per COUNT
#
# The smaps mappings are grouped:
#   guest memory   pages of the guests' memfds mapped by grant maps (rings, persistent
#                  grants): the guests' memory, counted in the daemon's RSS because it
#                  is mapped there (on real Xen, gntdev maps the guest's pages the same way);
#   grant tables   the simulated hypervisor's view of each guest's grant table (memfd);
#   io_uring       SQ/CQ rings and SQE arrays (kernel pages mapped into the daemon);
#   thread stacks  anonymous mappings holding a thread's stack pointer;
#   heap           [heap] (brk) and the other private anonymous mappings (malloc arenas
#                  of threads, large allocations glibc serves with mmap);
#   anon shared    MAP_SHARED|MAP_ANONYMOUS (bounce pools of grant-copy rings);
#   files          the binary and shared libraries.

: "${TOP:=12}"

# CPU time of PID (utime + stime, /proc/PID/stat fields 14 and 15) over SECS seconds, as
# % of one core in all and per device (N devices). Clock ticks (usually 10 ms): over 30 s
# that resolves 0.03 % of a core.
idle_cpu() { # idle_cpu PID SECS N
    local pid=$1 secs=$2 n=$3 tck t0 t1
    tck=$(getconf CLK_TCK)
    t0=$(awk '{print $14 + $15}' /proc/"$pid"/stat)
    sleep "$secs"
    t1=$(awk '{print $14 + $15}' /proc/"$pid"/stat)
    awk -v d=$((t1 - t0)) -v tck="$tck" -v s="$secs" -v n="$n" 'BEGIN {
        pct = d / tck / s * 100
        printf "idle CPU over %d s with %d idle devices: %.3f %% of a core, %.4f %% per device (%d ticks)\n", s, n, pct, pct / n, d }'
}

# Memory snapshot of PID into FILE as `key value` lines (kB unless the key says otherwise).
snapshot() {
    local pid=$1 out=$2 sps="" t line sp
    for t in /proc/"$pid"/task/*; do
        line=$(cat "$t/syscall" 2>/dev/null) || continue
        # "<nr> <6 args> <sp> <pc>" or "-1 <sp> <pc>" (blocked outside a syscall);
        # "running" / zeros for io-wq workers.
        set -- $line
        [ $# -ge 3 ] || continue
        eval "sp=\${$(($# - 1))}"
        [ "$sp" != 0x0 ] && sps="$sps $sp"
    done
    cp /proc/"$pid"/smaps "$out.smaps"
    {
        awk '/^(VmRSS|RssAnon|RssFile|RssShmem|VmPTE|VmSize):/ {print $1, $2}
             /^Threads:/ {print "threads", $2}' /proc/"$pid"/status | tr -d :
        awk '/^(Pss|Pss_Anon|Pss_File|Pss_Shmem|Private_Clean|Private_Dirty|Shared_Clean|Shared_Dirty):/ {print "rollup_" $1, $2}' \
            /proc/"$pid"/smaps_rollup | tr -d :
        echo "vmas $(wc -l < /proc/"$pid"/maps)"
        echo "fds $(ls /proc/"$pid"/fd | wc -l)"
        awk -v sps="$sps" -v top="$TOP" -v topfile="$out.top" '
            function hex(s,   i, c, v) {
                s = tolower(s); sub(/^0x/, "", s); v = 0
                for (i = 1; i <= length(s); i++) {
                    c = index("0123456789abcdef", substr(s, i, 1)) - 1
                    v = v * 16 + c
                }
                return v
            }
            function flush_map() {
                if (cat == "") return
                n[cat]++; size[cat] += msize; rss[cat] += mrss; pss[cat] += mpss
                priv[cat] += mpriv
                if (mrss > 0) printf "%d %d %s %s\n", mrss, msize, cat, hdr > topfile
            }
            BEGIN { ns = split(sps, sp, " "); for (i = 1; i <= ns; i++) spv[i] = hex(sp[i]) }
            /^[0-9a-f]+-[0-9a-f]+ / {
                flush_map()
                hdr = $0; split($1, r, "-"); lo = hex(r[1]); hi = hex(r[2])
                perms = $2; name = ""
                for (i = 6; i <= NF; i++) name = name (i > 6 ? " " : "") $i
                if (name ~ /memfd:xenblkd-sim-guest-memory/) cat = "guest_memory"
                else if (name ~ /memfd:xenblkd-sim-grant-table/) cat = "grant_tables"
                else if (name ~ /io_uring/) cat = "io_uring"
                else if (name == "[heap]") cat = "heap"
                else if (name == "[stack]") cat = "thread_stacks"
                else if (name ~ /^\/dev\/zero/ || name ~ /^\[anon_shmem/ || (name == "" && perms ~ /s$/)) cat = "anon_shared"
                else if (name == "") {
                    cat = "heap"
                    for (i = 1; i <= ns; i++) if (spv[i] >= lo && spv[i] < hi) cat = "thread_stacks"
                }
                else if (name ~ /^\//) cat = "files"
                else cat = "other"
                msize = 0; mrss = 0; mpss = 0; mpriv = 0
                next
            }
            /^Size:/ { msize = $2 }
            /^Rss:/ { mrss = $2 }
            /^Pss:/ { mpss = $2 }
            /^Private_(Clean|Dirty):/ { mpriv += $2 }
            END {
                flush_map()
                for (c in n) {
                    print "maps_" c, n[c]; print "size_" c, size[c]; print "rss_" c, rss[c]
                    print "pss_" c, pss[c]; print "priv_" c, priv[c]
                }
            }' /proc/"$pid"/smaps
    } > "$out"
    sort -rn "$out.top" -o "$out.top"
}

get() { awk -v k="$2" '$1 == k {print $2; f = 1} END {if (!f) print 0}' "$1"; }

CATS="guest_memory grant_tables io_uring heap thread_stacks anon_shared files other"

# One line per metric: the value in each snapshot and the delta between two of them.
report() { # report TITLE FROM TO COUNT SNAPSHOT...
    local title=$1 from=$2 to=$3 count=$4; shift 4
    local snaps=("$@") s k
    echo
    echo "### $title"
    W=14
    for s in "${snaps[@]}"; do s=$(basename "$s"); [ $((${#s} + 2)) -le $W ] || W=$((${#s} + 2)); done
    printf '%-34s' "kB"
    for s in "${snaps[@]}"; do printf '%*s' "$W" "$(basename "$s")"; done
    printf '%12s%14s\n' "delta" "per device"
    row() { # row LABEL VALUES-COMMAND (prints value per snapshot via `val SNAP`)
        local label=$1 a b v
        printf '%-34s' "$label"
        for s in "${snaps[@]}"; do printf '%*s' "$W" "$(val "$s")"; done
        a=$(val "$from"); b=$(val "$to")
        printf '%12s%14s\n' "$((b - a))" "$(awk -v d=$((b - a)) -v n="$count" 'BEGIN {printf "%.1f", d / n}')"
    }
    val() { get "$1" VmRSS; };                                    row "VmRSS"
    val() { echo $(( $(get "$1" VmRSS) - $(get "$1" rss_guest_memory) - $(get "$1" rss_grant_tables) )); }
                                                                  row "  daemon own (RSS - guest pages)"
    val() { get "$1" rss_guest_memory; };                         row "  guest memory mapped"
    val() { get "$1" rss_grant_tables; };                         row "  grant tables (sim hypervisor)"
    val() { get "$1" rss_io_uring; };                             row "  io_uring rings"
    val() { get "$1" rss_heap; };                                 row "  heap (brk + anon mmaps)"
    val() { get "$1" rss_thread_stacks; };                        row "  thread stacks"
    val() { get "$1" rss_anon_shared; };                          row "  anon shared (bounce pools)"
    val() { get "$1" rss_files; };                                row "  binary + libraries"
    val() { get "$1" rss_other; };                                row "  other ([vdso], ...)"
    val() { get "$1" RssAnon; };                                  row "RssAnon (private anonymous)"
    val() { get "$1" RssFile; };                                  row "RssFile"
    val() { get "$1" RssShmem; };                                 row "RssShmem"
    val() { get "$1" rollup_Pss; };                               row "Pss"
    val() { echo $(( $(get "$1" rollup_Private_Clean) + $(get "$1" rollup_Private_Dirty) )); }
                                                                  row "Private (clean + dirty)"
    val() { get "$1" VmPTE; };                                    row "VmPTE (page tables)"
    val() { get "$1" vmas; };                                     row "mappings (VMAs, count)"
    val() { get "$1" maps_guest_memory; };                        row "  guest-memory VMAs (count)"
    val() { get "$1" threads; };                                  row "threads (count)"
    val() { get "$1" fds; };                                      row "open fds (count)"
}


# "daemon own" of a snapshot: what the daemon costs by itself (kB).
own_kb() { echo $(( $(get "$1" VmRSS) - $(get "$1" rss_guest_memory) - $(get "$1" rss_grant_tables) )); }

# CPU time of PID so far, in clock ticks (utime + stime).
cpu_ticks() { awk '{print $14 + $15}' /proc/"$1"/stat; }
