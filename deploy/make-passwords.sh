#!/bin/sh
# Make the Mosquitto password file for a DeTransformer Edge home, plus one password file per
# user for its config (agent: [broker] password_file; voice client: its own config).
#
#   sh deploy/make-passwords.sh kitchen-pi living-room-minipc --voice voice --homeassistant --rhasspy
#   sh deploy/make-passwords.sh --out /tmp/secrets --passwords /tmp/passwords kitchen-pi
#
# Arguments are agent usernames, which must equal the device ids (`id` in agent.toml): the
# ACL (deploy/acl) lets user X write only detransformer/<cluster>/devices/X/#.
# --voice NAME adds a voice-client user (repeatable); --homeassistant and --rhasspy add the users
# `homeassistant` and `rhasspy` that deploy/acl gives Home Assistant's and Rhasspy's rights.
#
# Writes (both kept out of git by .gitignore):
#   deploy/passwords                 the broker's hashed password file (mosquitto_passwd)
#   deploy/secrets/<user>.password   each user's clear-text password, mode 0600
# Idempotent: a user that already has deploy/secrets/<user>.password keeps it; the broker
# file is rebuilt from the secrets each run. Needs mosquitto_passwd (package mosquitto).
set -eu

here="$(dirname "$0")"
out="$here/secrets"
passwords="$here/passwords"
users=""
while [ $# -gt 0 ]; do
    case "$1" in
        --out) out="$2"; shift 2 ;;
        --passwords) passwords="$2"; shift 2 ;;
        --voice) users="$users $2"; shift 2 ;;
        --homeassistant) users="$users homeassistant"; shift ;;
        --rhasspy) users="$users rhasspy"; shift ;;
        -h|--help) sed -n '2,19p' "$0"; exit 0 ;;
        -*) echo "make-passwords.sh: unknown option $1 (see --help)" >&2; exit 2 ;;
        *) users="$users $1"; shift ;;
    esac
done
[ -n "$users" ] || { echo "make-passwords.sh: name at least one user (see --help)" >&2; exit 2; }
command -v mosquitto_passwd >/dev/null || {
    echo "make-passwords.sh: mosquitto_passwd not found (apt-get install mosquitto)" >&2; exit 1; }

umask 077
mkdir -p "$out"
tmp="$passwords.tmp.$$"
: > "$tmp"
for u in $users; do
    case "$u" in
        *[!A-Za-z0-9_.-]*|[!A-Za-z0-9]*) echo "make-passwords.sh: bad user name '$u' (use a device id)" >&2
            rm -f "$tmp"; exit 2 ;;
    esac
    secret="$out/$u.password"
    if [ ! -s "$secret" ]; then
        openssl rand -base64 24 2>/dev/null | tr -d '\n' > "$secret" \
            || head -c 24 /dev/urandom | base64 | tr -d '\n' > "$secret"
        echo "new password for $u in $secret"
    fi
    mosquitto_passwd -b "$tmp" "$u" "$(cat "$secret")"
done
mv "$tmp" "$passwords"
chmod 0600 "$passwords"
cat <<EOF

Broker password file: $passwords
  docker compose: it is mounted as /mosquitto/config/passwords (make it readable by the
  container's mosquitto user: sudo chown 1883:1883 $passwords)
  plain Mosquitto: copy it to /etc/mosquitto/passwords and set password_file to that path

Each agent: copy $out/<device id>.password to the device (e.g. /etc/detransformer/mqtt.password,
mode 0600) and set in its agent.toml:
  [broker]
  username = "<device id>"
  password_file = "/etc/detransformer/mqtt.password"
Voice clients, Home Assistant and Rhasspy: log in with their user name and $out/<name>.password
(Home Assistant: the MQTT integration; Rhasspy: Settings -> MQTT, External).
Check deploy/acl lists every agent user. See docs/OPERATIONS.md, "Credentials and TLS".
EOF
