#!/bin/sh
# Make a home CA and TLS certificates for the Mosquitto broker (and, optionally, clients).
#
#   sh deploy/make-certs.sh                              # CA + broker cert in deploy/certs/
#   sh deploy/make-certs.sh --host broker.lan --host 192.168.1.20
#   sh deploy/make-certs.sh --client kitchen-pi          # also a client cert (mutual TLS)
#   sh deploy/make-certs.sh --dir /tmp/certs --force     # elsewhere; remake the leaf certs
#
# Writes into the directory (default deploy/certs, which .gitignore keeps out of git):
#   ca.crt ca.key            the home CA (ca.key never leaves this machine; ca.crt goes to
#                            every agent as [broker.tls] ca_file)
#   server.crt server.key    the broker's certificate: SANs localhost, 127.0.0.1, ::1, the
#                            machine's hostname and every --host given
#   <name>.crt <name>.key    client certificates for --client names (optional)
#
# Idempotent: existing files are kept (run again with new --client names to add clients);
# --force remakes the server and client certificates (never the CA: delete ca.* to do that).
# Needs openssl.
set -eu

dir="$(dirname "$0")/certs"
days=3650
force=0
hosts=""
clients=""
while [ $# -gt 0 ]; do
    case "$1" in
        --dir) dir="$2"; shift 2 ;;
        --host) hosts="$hosts $2"; shift 2 ;;
        --client) clients="$clients $2"; shift 2 ;;
        --days) days="$2"; shift 2 ;;
        --force) force=1; shift ;;
        -h|--help) sed -n '2,20p' "$0"; exit 0 ;;
        *) echo "make-certs.sh: unknown argument $1 (see --help)" >&2; exit 2 ;;
    esac
done
command -v openssl >/dev/null || { echo "make-certs.sh: openssl is not installed" >&2; exit 1; }
mkdir -p "$dir"
umask 077  # keys readable by their owner only

# Subject alternative names: DNS names and IP addresses, each once.
san="DNS:localhost,IP:127.0.0.1,IP:0:0:0:0:0:0:0:1"
for h in $(hostname 2>/dev/null || true) $hosts; do
    case "$h" in
        *[!0-9.]*) case "$h" in *:*) entry="IP:$h" ;; *) entry="DNS:$h" ;; esac ;;
        *) entry="IP:$h" ;;
    esac
    case ",$san," in *",$entry,"*) ;; *) san="$san,$entry" ;; esac
done

if [ ! -f "$dir/ca.key" ] || [ ! -f "$dir/ca.crt" ]; then
    openssl req -x509 -new -newkey rsa:3072 -nodes -sha256 -days "$days" \
        -subj "/CN=DeTransformer Edge home CA" \
        -addext "basicConstraints=critical,CA:TRUE" -addext "keyUsage=critical,keyCertSign,cRLSign" \
        -keyout "$dir/ca.key" -out "$dir/ca.crt" 2>/dev/null
    echo "made CA            $dir/ca.crt"
fi

# leaf NAME CN EXTENDED_KEY_USAGE SAN
leaf() {
    if [ -f "$dir/$1.crt" ] && [ -f "$dir/$1.key" ] && [ "$force" = 0 ]; then
        echo "kept               $dir/$1.crt"
        return
    fi
    ext="$dir/.$1.ext"
    {
        echo "basicConstraints=CA:FALSE"
        echo "keyUsage=critical,digitalSignature,keyEncipherment"
        echo "extendedKeyUsage=$3"
        [ -n "$4" ] && echo "subjectAltName=$4"
    } > "$ext"
    openssl req -new -newkey rsa:2048 -nodes -subj "/CN=$2" -keyout "$dir/$1.key" -out "$dir/.$1.csr" 2>/dev/null
    openssl x509 -req -in "$dir/.$1.csr" -CA "$dir/ca.crt" -CAkey "$dir/ca.key" -CAcreateserial \
        -CAserial "$dir/.ca.srl" -days "$days" -sha256 -extfile "$ext" -out "$dir/$1.crt" 2>/dev/null
    rm -f "$ext" "$dir/.$1.csr"
    echo "made certificate   $dir/$1.crt ($2)"
}

leaf server "DeTransformer Edge broker" serverAuth "$san"
for c in $clients; do
    case "$c" in server|ca) echo "make-certs.sh: '$c' is reserved" >&2; exit 2 ;; esac
    leaf "$c" "$c" clientAuth ""
done
chmod 0644 "$dir"/*.crt
echo "broker certificate names: $(openssl x509 -in "$dir/server.crt" -noout -ext subjectAltName 2>/dev/null | tail -n 1 | sed 's/^ *//')"
echo "(an existing certificate is kept: add --force to remake it with new --host names)"
echo "Mosquitto: cafile $dir/ca.crt, certfile $dir/server.crt, keyfile $dir/server.key"
echo "Agents: copy $dir/ca.crt to each device and set [broker.tls] ca_file (docs/OPERATIONS.md)."
