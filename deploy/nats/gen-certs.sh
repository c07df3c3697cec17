#!/bin/sh
# Makes the TLS files of a NATS deployment without a certificate manager (the compose stack, tests):
# a CA (ca.pem, ca-key.pem), the server's certificate for the given names (server.pem, server-key.pem)
# and a client certificate per Trellis process (<process>.pem, <process>-key.pem), ECDSA P-256.
#
#   deploy/nats/gen-certs.sh OUT_DIR [SERVER_NAME ...]
#
# Default names: nats (the name clients check, NATS_TLS_SERVER_NAME), nats-1 nats-2 nats-3 (the
# cluster's nodes, deploy/compose.cluster.yaml: their routes check these names), localhost and
# 127.0.0.1. One set of files serves the single node and the cluster.
#
# Keep ca-key.pem out of every container: only the CA certificate is distributed.
set -eu
out=${1:?usage: gen-certs.sh OUT_DIR [SERVER_NAME ...]}
shift
[ $# -gt 0 ] || set -- nats nats-1 nats-2 nats-3 localhost 127.0.0.1
days=${CERT_DAYS:-397}
mkdir -p "$out"
cd "$out"

key() { openssl genpkey -algorithm EC -pkeyopt ec_paramgen_curve:P-256 -out "$1"; }

key ca-key.pem
openssl req -x509 -new -key ca-key.pem -out ca.pem -days "$days" -subj "/CN=Trellis NATS CA" \
  -addext "basicConstraints=critical,CA:TRUE" -addext "keyUsage=critical,keyCertSign,cRLSign"

# issue NAME EXTENDED_KEY_USAGE SUBJECT_ALT_NAMES
issue() {
  key "$1-key.pem"
  openssl req -new -key "$1-key.pem" -out "$1.csr" -subj "/CN=$1"
  printf 'basicConstraints=CA:FALSE\nkeyUsage=critical,digitalSignature\nextendedKeyUsage=%s\nsubjectAltName=%s\n' \
    "$2" "$3" > "$1.ext"
  openssl x509 -req -in "$1.csr" -CA ca.pem -CAkey ca-key.pem -CAcreateserial -out "$1.pem" -days "$days" \
    -extfile "$1.ext" 2>/dev/null
  rm -f "$1.csr" "$1.ext"
}

sans=""
for name in "$@"; do
  case "$name" in
    *[!0-9.]*) sans="${sans:+$sans,}DNS:$name" ;;
    *) sans="${sans:+$sans,}IP:$name" ;;
  esac
done
# serverAuth for clients, clientAuth as well: in a cluster each node presents it on the routes it
# opens (deploy/nats/cluster.conf).
issue server serverAuth,clientAuth "$sans"
for process in trellis-api search-projector score-orchestrator dispute-processor trellisctl; do
  issue "$process" clientAuth "DNS:$process"
done
rm -f ca.srl
# The processes run as a non-root user in their containers: the keys must be readable by it.
chmod 644 ./*.pem
chmod 600 ca-key.pem
echo "TLS files in $out: ca.pem, server.pem/server-key.pem (for $*), and one client certificate per process"
