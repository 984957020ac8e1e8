#!/usr/bin/env bash
# Prepare this (Debian bookworm, root) machine to build and run opbox job images with podman.
#
#   1. apt packages: podman, buildah, runc, debootstrap, netavark, bubblewrap (the local backend's
#      sandbox), ... (only when missing)
#   2. /etc/containers/containers.conf: runc, default ulimits, cgroupfs/file events without systemd
#      (merged key by key into an existing file; other settings are kept)
#   3. /etc/containers/storage.conf: native overlay when the kernel lets us mount it, else
#      fuse-overlayfs, else vfs (an existing storage.conf is left alone)
#   4. the base image localhost/opbox-base:bookworm-py3 (debootstrap minbase + python3-venv,
#      imported with `podman import`), unless it exists already
#
# Idempotent, quiet, needs no TTY or stdin. Prints how long each step took.
# Environment: OPBOX_BASE_IMAGE (default localhost/opbox-base:bookworm-py3),
#              OPBOX_DEBIAN_MIRROR (default: the bookworm mirror apt is configured with),
#              OPBOX_FORCE_BASE=1 to rebuild the base image.
set -euo pipefail
exec </dev/null
export DEBIAN_FRONTEND=noninteractive LC_ALL=C

BASE_IMAGE="${OPBOX_BASE_IMAGE:-localhost/opbox-base:bookworm-py3}"
SUITE=bookworm
CONF_DIR=/etc/containers
PACKAGES=(podman buildah runc conmon debootstrap debian-archive-keyring netavark aardvark-dns
          catatonit uidmap fuse-overlayfs docker-registry bubblewrap)

if [ "$(id -u)" != 0 ]; then
  echo "setup-podman: must run as root" >&2
  exit 1
fi

_t0=$(date +%s.%N)
_step_start() { _ts=$(date +%s.%N); _step="$1"; }
# awk does the float arithmetic: it is always there (mawk is Essential on Debian), bc is not
_elapsed() { awk -v a="$1" -v b="$2" 'BEGIN{printf "%.1f", b-a}'; }
_step_end() {
  printf 'setup-podman: %-14s %6ss  %s\n' "$_step" "$(_elapsed "$_ts" "$(date +%s.%N)")" "${1:-}"
}

# --- 1. packages -------------------------------------------------------------------------
_step_start packages
missing=()
for p in "${PACKAGES[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
  apt-get update -qq >/dev/null
  # --no-install-recommends keeps out dbus-user-session, slirp4netns (rootless only), criu, ...
  apt-get install -y -qq --no-install-recommends "${missing[@]}" >/tmp/opbox-setup-apt.log 2>&1 || {
    cat /tmp/opbox-setup-apt.log >&2; exit 1; }
  # docker-registry is for the tests, which start their own on free loopback ports: the
  # package's system service (all interfaces, :5000) must not run
  if [[ " ${missing[*]} " == *" docker-registry "* ]]; then
    if [ -d /run/systemd/system ]; then
      systemctl disable --now docker-registry >/dev/null 2>&1 || true
    else
      update-rc.d docker-registry disable >/dev/null 2>&1 || true
      /etc/init.d/docker-registry stop >/dev/null 2>&1 || true
    fi
  fi
  _step_end "installed: ${missing[*]}"
else
  _step_end "all present"
fi

# --- 2. containers.conf ------------------------------------------------------------------
_step_start containers.conf
mkdir -p "$CONF_DIR"
settings=(
  'containers|default_ulimits|["nofile=20000:20000", "nproc=1024:1024"]'
  'engine|runtime|"runc"'
  # podman ships a CNI bridge config in /etc/cni/net.d: say netavark so it is not probed
  'network|network_backend|"netavark"'
)
if [ ! -d /run/systemd/system ]; then
  # no systemd as PID 1 (containers, VMs started by a supervisor): no systemd cgroup manager
  # and no journald to log events to
  settings+=('engine|cgroup_manager|"cgroupfs"' 'engine|events_logger|"file"')
fi
merge_toml() {  # merge_toml FILE "section|key|value"...: set keys in place, keep everything else
  local file="$1"; shift
  touch "$file"
  local tmp; tmp=$(mktemp)
  awk -v specs="$(printf '%s\n' "$@")" '
    BEGIN {
      n = split(specs, lines, "\n")
      for (i = 1; i <= n; i++) {
        if (lines[i] == "") continue
        split(lines[i], f, "|"); sec[i] = f[1]; key[i] = f[2]
        val[i] = substr(lines[i], length(f[1]) + length(f[2]) + 3); done[i] = 0; cnt = i
      }
      cur = ""
    }
    function flush(s,   i) {  # keys of section s not seen yet go at its end
      for (i = 1; i <= cnt; i++) if (sec[i] == s && !done[i]) { print key[i] " = " val[i]; done[i] = 1 }
    }
    /^[ \t]*\[[^\[]/ {
      flush(cur)
      cur = $0; sub(/^[ \t]*\[/, "", cur); sub(/\].*$/, "", cur); gsub(/[ \t]/, "", cur)
      seen[cur] = 1; print; next
    }
    function depth(s,   o, c) { o = gsub(/\[/, "[", s); c = gsub(/\]/, "]", s); return o - c }
    skip > 0 { skip += depth($0); next }   # rest of a multi-line array being replaced
    {
      for (i = 1; i <= cnt; i++) {
        if (sec[i] == cur && match($0, "^[ \t]*" key[i] "[ \t]*=")) {
          if (!done[i]) { print key[i] " = " val[i]; done[i] = 1 }
          v = $0; sub(/#.*$/, "", v); skip = depth(v)
          next   # drop the old value (and any duplicate)
        }
      }
      print
    }
    END {
      flush(cur)
      for (i = 1; i <= cnt; i++) if (!done[i]) {   # sections the file does not have yet
        if (NR > 0 || wrote) print ""
        print "[" sec[i] "]"; wrote = 1
        flush(sec[i])
      }
    }' "$file" >"$tmp"
  if cmp -s "$tmp" "$file"; then rm -f "$tmp"; return 1; fi
  cat "$tmp" >"$file"; rm -f "$tmp"; return 0
}
if merge_toml "$CONF_DIR/containers.conf" "${settings[@]}"; then
  _step_end "updated $CONF_DIR/containers.conf"
else
  _step_end "unchanged"
fi

# --- 3. storage.conf ---------------------------------------------------------------------
_step_start storage.conf
if [ -s "$CONF_DIR/storage.conf" ] && grep -Eq '^[[:space:]]*driver[[:space:]]*=' "$CONF_DIR/storage.conf"; then
  _step_end "kept existing ($(grep -Em1 '^[[:space:]]*driver' "$CONF_DIR/storage.conf" | tr -d ' '))"
else
  graphroot=/var/lib/containers/storage
  mkdir -p "$graphroot"
  probe=$(mktemp -d "$graphroot/.overlay-probe.XXXXXX")
  mkdir -p "$probe"/{lower,upper,work,merged}
  echo x >"$probe/lower/f"
  driver=vfs; extra=""
  if mount -t overlay overlay -o "lowerdir=$probe/lower,upperdir=$probe/upper,workdir=$probe/work" "$probe/merged" 2>/dev/null; then
    [ -f "$probe/merged/f" ] && driver=overlay
    umount "$probe/merged" || true
  elif command -v fuse-overlayfs >/dev/null && [ -e /dev/fuse ] &&
       fuse-overlayfs -o "lowerdir=$probe/lower,upperdir=$probe/upper,workdir=$probe/work" "$probe/merged" 2>/dev/null; then
    [ -f "$probe/merged/f" ] && { driver=overlay; extra='mount_program = "/usr/bin/fuse-overlayfs"'; }
    fusermount3 -u "$probe/merged" 2>/dev/null || umount "$probe/merged" || true
  fi
  rm -rf "$probe"
  {
    echo '# written by opbox scripts/setup-podman.sh'
    echo '[storage]'
    echo "driver = \"$driver\""
    echo 'runroot = "/run/containers/storage"'
    echo "graphroot = \"$graphroot\""
    if [ -n "$extra" ]; then echo; echo '[storage.options.overlay]'; echo "$extra"; fi
  } >"$CONF_DIR/storage.conf"
  _step_end "driver=$driver${extra:+ (fuse-overlayfs)}"
fi

# --- 4. base image -----------------------------------------------------------------------
_step_start base-image
if [ "${OPBOX_FORCE_BASE:-0}" != 1 ] && podman image exists "$BASE_IMAGE"; then
  _step_end "$BASE_IMAGE exists"
else
  mirror="${OPBOX_DEBIAN_MIRROR:-}"
  if [ -z "$mirror" ]; then
    # the mirror apt uses for the main bookworm suite: deb822 (*.sources) or one-line (*.list)
    for f in /etc/apt/sources.list.d/*.sources; do
      [ -f "$f" ] || continue
      mirror=$(awk -v s="$SUITE" '
        BEGIN { RS = ""; FS = "\n" }
        {
          uris = ""; ok = 0; en = 1
          for (i = 1; i <= NF; i++) {
            if ($i ~ /^URIs:/)    { uris = $i; sub(/^URIs:[ \t]*/, "", uris); split(uris, u, /[ \t]+/); uris = u[1] }
            if ($i ~ /^Suites:/)  { n = split($i, w, /[ \t]+/); for (j = 2; j <= n; j++) if (w[j] == s) ok = 1 }
            if ($i ~ /^Enabled:[ \t]*no/) en = 0
          }
          if (ok && en && uris ~ /^https?:/) { print uris; exit }
        }' "$f")
      [ -n "$mirror" ] && break
    done
  fi
  if [ -z "$mirror" ]; then
    mirror=$(cat /etc/apt/sources.list /etc/apt/sources.list.d/*.list 2>/dev/null |
      awk -v s="$SUITE" '$1 == "deb" { for (i = 2; i <= NF; i++) if ($i ~ /^https?:/) { if ($(i+1) == s) { print $i; exit } ; break } }')
  fi
  mirror="${mirror:-http://deb.debian.org/debian}"
  rootfs=$(mktemp -d /var/tmp/opbox-base.XXXXXX)
  trap 'rm -rf "$rootfs"' EXIT
  if ! debootstrap --variant=minbase --include=python3,python3-venv "$SUITE" "$rootfs" "$mirror" \
       >/tmp/opbox-setup-debootstrap.log 2>&1; then
    tail -n 40 /tmp/opbox-setup-debootstrap.log >&2
    [ -f "$rootfs/debootstrap/debootstrap.log" ] && tail -n 40 "$rootfs/debootstrap/debootstrap.log" >&2
    echo "setup-podman: debootstrap from $mirror failed" >&2
    exit 1
  fi
  # a smaller image: no downloaded .debs, no package lists, no docs
  rm -rf "$rootfs"/var/cache/apt/archives/*.deb "$rootfs"/var/lib/apt/lists/* \
         "$rootfs"/usr/share/doc/* "$rootfs"/usr/share/man/* "$rootfs"/usr/share/info/*
  tar -C "$rootfs" --numeric-owner -c . | podman import -q \
    --change 'ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
    --change 'ENV LANG=C.UTF-8' \
    --change 'CMD ["/bin/bash"]' \
    --message "debootstrap --variant=minbase --include=python3,python3-venv $SUITE ($mirror)" \
    - "$BASE_IMAGE" >/dev/null
  rm -rf "$rootfs"; trap - EXIT
  py=$(podman run --rm --network=none "$BASE_IMAGE" python3 -c 'import sys, venv; print("%d.%d.%d" % sys.version_info[:3])')
  _step_end "built $BASE_IMAGE from $mirror (python $py, $(podman image inspect -f '{{.Size}}' "$BASE_IMAGE" | awk '{printf "%.0f MB", $1/1e6}'))"
fi

printf 'setup-podman: %-14s %6ss\n' total "$(_elapsed "$_t0" "$(date +%s.%N)")"
