#!/bin/sh
# Write the Mosquitto ACL of a DeTransformer Edge home from its device list (deploy/acl is this
# script's output for the example home; regenerate it instead of editing device names by hand).
#
#   sh deploy/make-acl.sh kitchen-pi living-room-minipc --voice voice --rhasspy --homeassistant
#   sh deploy/make-acl.sh --cluster flat --out /etc/mosquitto/acl pi-a pi-b
#
# Arguments are device ids (`id` in each agent.toml; each is also that device's MQTT username).
# --cluster NAME (default home) is `cluster` in agent.toml; --voice NAME adds a voice-client user
# (repeatable); --homeassistant and --rhasspy add the users Home Assistant and Rhasspy log in as;
# --out FILE (default: standard output). deploy/make-passwords.sh makes the matching passwords.
set -eu

cluster="home"
out=""
devices=""
voices=""
homeassistant=""
rhasspy=""
while [ $# -gt 0 ]; do
    case "$1" in
        --cluster) cluster="$2"; shift 2 ;;
        --out) out="$2"; shift 2 ;;
        --voice) voices="$voices $2"; shift 2 ;;
        --homeassistant) homeassistant=1; shift ;;
        --rhasspy) rhasspy=1; shift ;;
        -h|--help) sed -n '2,11p' "$0"; exit 0 ;;
        -*) echo "make-acl.sh: unknown option $1 (see --help)" >&2; exit 2 ;;
        *) devices="$devices $1"; shift ;;
    esac
done
[ -n "$devices" ] || { echo "make-acl.sh: name at least one device id (see --help)" >&2; exit 2; }
for name in "$cluster" $devices $voices; do
    case "$name" in
        *[!A-Za-z0-9_.-]*|[!A-Za-z0-9]*)
            echo "make-acl.sh: '$name' is not a valid id (1-64 of A-Z a-z 0-9 _ . -, starting with a letter or digit)" >&2
            exit 2 ;;
    esac
done

P="detransformer/$cluster"
acl() {
cat <<EOF
# Mosquitto ACL for a DeTransformer Edge home (deploy/mosquitto.conf mounts it as
# /mosquitto/config/acl). Mosquitto 2 denies everything that no line below allows.
# Written by deploy/make-acl.sh (cluster "$cluster"): add or remove a device by running it again.
#
# Roles:
#   agent  one MQTT user per device; the username IS the device id (\`id\` in its agent.toml).
#          It may write only its own device topics, and the topics any agent needs because
#          any agent can become leader: the lease, assignments, run traffic, replies.
#   voice  a voice assistant / app: asks questions, reads answers, nothing else.
#   homeassistant  Home Assistant's MQTT integration: reads the discovery configs and the
#          devices' status and presence, writes its birth message (homeassistant/status).
#   rhasspy  Rhasspy 2.5 with an external MQTT broker: all of its services talk Hermes with each
#          other (hermes/#, rhasspy/#); its NLU set to "Hermes MQTT" leaves queries to the home.
#
# Caveat: with the shared read rules an agent can read the whole cluster (it must, to plan and
# to take over as leader). What stops a compromised device from commanding others is the
# cluster key (control messages are HMAC-signed), not this file.

# Nothing for anonymous clients (mosquitto.conf also sets allow_anonymous false).

# ----------------------------------------------------------------------------- agents
EOF
for d in $devices; do
    # Home Assistant node ids keep only A-Z a-z 0-9 _ - (integrations/homeassistant.py node_id)
    node="detransformer_$(printf '%s_%s' "$cluster" "$d" | tr -c 'A-Za-z0-9_\n-' '_')"
    cat <<EOF

user $d
topic write $P/devices/$d/#
topic write homeassistant/sensor/$node/#
topic read $P/#
topic write $P/leader
topic write $P/assign/#
topic write $P/run/#
topic write $P/weights/#
topic write $P/replies/#
topic write $P/request
topic write $P/log
topic read hermes/nlu/query
topic write hermes/intent/#
topic write hermes/nlu/intentParsed
topic write hermes/nlu/intentNotRecognized
topic write hermes/error/nlu
topic read homeassistant/status
EOF
done
if [ -n "$voices$rhasspy" ]; then
    cat <<EOF

# ----------------------------------------------------------------------------- voice clients
EOF
fi
for v in $voices; do
    cat <<EOF

# Requests go to the leader on P/request with reply_to = $P/replies/<username>
# (the only reply topic this user may read: see the pattern at the end).
user $v
topic write hermes/nlu/query
topic read hermes/intent/#
topic read hermes/nlu/intentParsed
topic read hermes/nlu/intentNotRecognized
topic read hermes/error/nlu
topic write $P/request
EOF
done
if [ -n "$rhasspy" ]; then
    cat <<EOF

# Rhasspy 2.5 (Settings -> MQTT: External, this username). Its own services (audio, wake word,
# speech to text, dialogue manager, text to speech) exchange hermes/# messages among themselves.
user rhasspy
topic readwrite hermes/#
topic readwrite rhasspy/#
EOF
fi
if [ -n "$homeassistant" ]; then
    cat <<EOF

# ----------------------------------------------------------------------------- Home Assistant

# Home Assistant's MQTT integration (Settings -> Devices & services -> MQTT, this username).
# It talks to the home's intent model over Wyoming (TCP), not over MQTT.
user homeassistant
topic read homeassistant/#
topic write homeassistant/status
topic read $P/devices/+/status
topic read $P/devices/+/presence
EOF
fi
cat <<EOF

# ----------------------------------------------------------------------------- every user

# Each user may read replies addressed to its own username.
pattern read detransformer/+/replies/%u/#
pattern read detransformer/+/replies/%u
EOF
}

if [ -n "$out" ]; then
    tmp="$out.tmp.$$"
    acl > "$tmp"
    mv "$tmp" "$out"
    echo "wrote $out: devices$devices" >&2
else
    acl
fi
