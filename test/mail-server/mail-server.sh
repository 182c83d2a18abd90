#!/usr/bin/env bash
# A real mail server for the email tests: Postfix (SMTP, AUTH through Dovecot) delivering over LMTP
# to Dovecot (IMAP with IDLE, Maildir), both on 127.0.0.1, as instances of their own under one
# directory, on the ports given. Never the system instances, never ports 25/143/587.
# Learnt from shared/mail-test-server (its README has the measurements and quirks).
#
#   mail-server.sh install                      Postfix + Dovecot from Debian, when absent (root)
#   mail-server.sh start DIR SMTP_PORT IMAP_PORT [USERS]
#                                               configure an instance under DIR, start it (~1 s)
#   mail-server.sh stop-smtp DIR | start-smtp DIR   Postfix alone away and back (an SMTP outage)
#   mail-server.sh stop-imap DIR | start-imap DIR   Dovecot alone away and back (IMAP, and delivery)
#   mail-server.sh stop DIR                     stop both and delete DIR
# USERS: "addr:password ..." (default: bridge@localhost, alice@localhost and bob@localhost, each
# with the password <name>pass). Plus-addressing: bridge+token@localhost reaches bridge's INBOX.
# Needs root (apt, `postfix -c`, Dovecot's privilege separation); the tests that use it skip otherwise.
set -euo pipefail

die() { printf '[mail-server] %s\n' "$*" >&2; exit 1; }
[ "$(id -u)" = 0 ] || die "must run as root"
VMAIL=tribridge-vmail

installed() { dpkg-query -W -f='${Status}' "$1" 2>/dev/null | grep -q '^install ok installed$'; }

install_packages() {
  local missing=() p
  for p in postfix dovecot-imapd dovecot-lmtpd; do installed "$p" || missing+=("$p"); done
  if [ ${#missing[@]} -gt 0 ]; then
    printf '[mail-server] installing %s from Debian\n' "${missing[*]}" >&2
    export DEBIAN_FRONTEND=noninteractive
    # No system Postfix: "No configuration" asks nothing and sets nothing up.
    printf '%s\n' 'postfix postfix/main_mailer_type select No configuration' \
      'postfix postfix/mailname string localhost' | debconf-set-selections
    # Keep dpkg from starting the system daemons (ports 25/143/993 on every interface) where no
    # policy says so already (Docker-style images have one).
    local policy_created=0
    if [ ! -e /usr/sbin/policy-rc.d ]; then
      printf '#!/bin/sh\nexit 101\n' >/usr/sbin/policy-rc.d
      chmod 755 /usr/sbin/policy-rc.d
      policy_created=1
    fi
    local apt=(apt-get -y -q -o DPkg::Lock::Timeout=300 -o Dpkg::Options::=--force-confdef
      -o Dpkg::Options::=--force-confold)
    if ! "${apt[@]}" install --no-install-recommends "${missing[@]}"; then
      "${apt[@]}" update
      "${apt[@]}" install --no-install-recommends "${missing[@]}"
    fi
    [ "$policy_created" = 0 ] || rm -f /usr/sbin/policy-rc.d
    # On a systemd host the packages enabled their system units: only the binaries are wanted.
    if [ -d /run/systemd/system ]; then
      systemctl disable --now postfix.service dovecot.service dovecot.socket >/dev/null 2>&1 || true
    fi
  fi
  if ! getent passwd "$VMAIL" >/dev/null; then
    getent group "$VMAIL" >/dev/null || groupadd --system "$VMAIL"
    useradd --system --gid "$VMAIL" --home-dir /nonexistent --no-create-home --shell /usr/sbin/nologin "$VMAIL"
  fi
}

port_open() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }
wait_port() {
  local _
  for _ in $(seq 1 100); do port_open "$1" && return 0; sleep 0.05; done
  die "$2 not listening on 127.0.0.1:$1 after 5 s (see $DIR/log/)"
}

paths() {
  DIR=$1
  [ -d "$DIR" ] || die "no such directory: $DIR"
  DCONF=$DIR/etc/dovecot/dovecot.conf
  PCONF=$DIR/etc/postfix
  DBASE=$DIR/run/dovecot
}

configure() {
  local smtp_port=$2 imap_port=$3
  local users=${4:-"bridge@localhost:bridgepass alice@localhost:alicepass bob@localhost:bobpass"}
  paths "$1"
  chmod 755 "$DIR" # Dovecot's login processes and the mailbox owner must reach into it
  install -d -m 755 "$DIR/etc" "$DIR/etc/dovecot" "$PCONF" "$DIR/run" "$DIR/log" "$DIR/spool"
  install -d -m 750 -o root -g dovecot "$DIR/state"
  install -d -m 700 -o postfix -g postfix "$DIR/postfix-data"
  install -d -m 700 -o "$VMAIL" -g "$VMAIL" "$DIR/mail"
  local vuid vgid entry addr pass domains=() users_file="" vmailbox=""
  vuid=$(id -u "$VMAIL")
  vgid=$(id -g "$VMAIL")
  for entry in $users; do
    addr=${entry%%:*} pass=${entry#*:}
    [ "$addr" != "$entry" ] && [ -n "$pass" ] || die "bad user '$entry' (want addr:password)"
    addr=$(printf '%s' "$addr" | tr '[:upper:]' '[:lower:]')
    [[ " ${domains[*]-} " == *" ${addr#*@} "* ]] || domains+=("${addr#*@}")
    users_file+="$addr:{PLAIN}$pass::::::"$'\n'
    vmailbox+="$addr OK"$'\n'
  done
  printf '%s' "$users_file" >"$DIR/etc/dovecot/users"
  chown root:dovecot "$DIR/etc/dovecot/users"
  chmod 640 "$DIR/etc/dovecot/users"
  printf '%s' "$vmailbox" >"$PCONF/vmailbox"

  cat >"$DCONF" <<CONF
instance_name = tribridge-$(basename "$DIR")
hostname = localhost
base_dir = $DBASE
state_dir = $DIR/state
listen = 127.0.0.1
protocols = imap lmtp
log_path = $DIR/log/dovecot.log
auth_mechanisms = plain login
disable_plaintext_auth = no
auth_default_realm = ${domains[0]}
passdb {
  driver = passwd-file
  args = scheme=PLAIN username_format=%Lu $DIR/etc/dovecot/users
}
userdb {
  driver = passwd-file
  args = username_format=%Lu $DIR/etc/dovecot/users
  default_fields = uid=$vuid gid=$vgid home=$DIR/mail/%Ld/%Ln
}
first_valid_uid = $vuid
last_valid_uid = $vuid
mail_location = maildir:~/Maildir
mail_fsync = never
recipient_delimiter = +
lmtp_save_to_detail_mailbox = no
ssl = no
protocol lmtp {
  postmaster_address = postmaster@${domains[0]}
}
protocol imap {
  mail_max_userip_connections = 200
}
service imap-login {
  inet_listener imap {
    address = 127.0.0.1
    port = $imap_port
  }
  inet_listener imaps {
    port = 0
  }
}
service lmtp {
  unix_listener lmtp {
    mode = 0600
    user = postfix
    group = postfix
  }
}
service auth {
  unix_listener auth-postfix {
    mode = 0600
    user = postfix
    group = postfix
  }
}
CONF

  cat >"$PCONF/main.cf" <<CONF
compatibility_level = 3.6
queue_directory = $DIR/spool
data_directory = $DIR/postfix-data
maillog_file = $DIR/log/postfix.log
maillog_file_prefixes = $DIR/log
myhostname = localhost
mydomain = localdomain
myorigin = \$myhostname
mydestination =
inet_interfaces = 127.0.0.1
inet_protocols = ipv4
mynetworks = 127.0.0.0/8
alias_maps =
alias_database =
local_recipient_maps =
biff = no
message_size_limit = 52428800
recipient_delimiter = +
virtual_mailbox_domains = ${domains[*]}
virtual_mailbox_maps = texthash:$PCONF/vmailbox
virtual_transport = lmtp:unix:$DBASE/lmtp
# nothing leaves this host: other domains are refused at RCPT time
smtpd_relay_restrictions = reject_unauth_destination
default_transport = error:outbound mail disabled
relay_transport = error:outbound mail disabled
smtpd_sasl_auth_enable = yes
smtpd_sasl_type = dovecot
smtpd_sasl_path = $DBASE/auth-postfix
smtpd_tls_security_level = none
# a delivery deferred while Dovecot was away is retried within seconds, not minutes
queue_run_delay = 2s
minimal_backoff_time = 2s
maximal_backoff_time = 10s
smtpd_client_connection_count_limit = 0
smtpd_client_connection_rate_limit = 0
in_flow_delay = 0
CONF
  # Debian's master.cf without the port-25 listener and without chroot, plus ours.
  {
    awk '!/^smtp[ \t]+inet[ \t]/' /usr/share/postfix/master.cf.dist |
      awk 'BEGIN{OFS="\t"} /^[a-z0-9]/ && NF>=8 && $5=="y" {$5="n"} {print}'
    printf '127.0.0.1:%s\tinet\tn\t-\tn\t-\t-\tsmtpd\n' "$smtp_port"
  } >"$PCONF/master.cf"
  printf '%s\n%s\n' "$smtp_port" "$imap_port" >"$DIR/ports"
}

smtp_port() { sed -n 1p "$DIR/ports"; }
imap_port() { sed -n 2p "$DIR/ports"; }

# The daemons get neither our stdout nor our stderr: a caller reading them through a pipe would
# otherwise wait for them to exit.
start_imap() {
  paths "$1"
  dovecot -c "$DCONF" </dev/null >/dev/null 2>>"$DIR/log/dovecot.stderr" ||
    { tail -5 "$DIR/log/dovecot.stderr" >&2; die "dovecot failed to start"; }
  wait_port "$(imap_port)" dovecot
  local _
  for _ in $(seq 1 100); do [ -S "$DBASE/lmtp" ] && [ -S "$DBASE/auth-postfix" ] && return 0; sleep 0.05; done
  die "dovecot's lmtp and auth sockets did not appear"
}

start_smtp() {
  paths "$1"

  postfix -c "$PCONF" start </dev/null >/dev/null 2>&1 ||
    { tail -20 "$DIR/log/postfix.log" >&2 || true; die "postfix failed to start"; }
  wait_port "$(smtp_port)" postfix
}

# Both stop commands return once their master has exited; the listening socket goes with it.
stop_smtp() {
  paths "$1"
  postfix -c "$PCONF" status >/dev/null 2>&1 || return 0
  postfix -c "$PCONF" stop </dev/null >/dev/null 2>&1 || true
}

stop_imap() {
  paths "$1"
  local pid
  pid=$(cat "$DBASE/master.pid" 2>/dev/null || true)
  [ -n "$pid" ] && kill -0 "$pid" 2>/dev/null || return 0
  dovecot -c "$DCONF" stop </dev/null >/dev/null 2>&1 || true
  local _
  for _ in $(seq 1 100); do kill -0 "$pid" 2>/dev/null || return 0; sleep 0.05; done
}

case "${1:-}" in
  install) install_packages ;;
  start)
    [ $# -ge 4 ] || die "usage: $0 start DIR SMTP_PORT IMAP_PORT [USERS]"
    install_packages
    configure "$2" "$3" "$4" "${5:-}"
    start_imap "$2"
    start_smtp "$2"
    ;;
  stop-smtp) stop_smtp "$2" ;;
  start-smtp) start_smtp "$2" ;;
  stop-imap) stop_imap "$2" ;;
  start-imap) start_imap "$2" ;;
  stop)
    paths "$2"
    stop_smtp "$2" &
    stop_imap "$2" &
    wait
    [ ! -f "$DIR/ports" ] || rm -rf -- "$DIR"
    ;;
  *) sed -n '2,16p' "$0" >&2; exit 2 ;;
esac
