//! A real Redis Cluster on loopback for the tests (Debian's `redis-server`): started
//! on free ports in a temporary directory, three primaries with a replica each, and
//! stopped when dropped. Each node runs under a small shell watchdog that kills it
//! when the test process is gone, so an aborted test run leaves nothing behind.
//!
//! `NETSWAP_TEST_REDIS_CLUSTER=host:port,...` (set by `scripts/test.sh`, which starts
//! one cluster for the whole run) is used by [`shared`] instead of starting another.

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

/// A running cluster.
pub struct RedisCluster {
    pub ports: Vec<u16>,
    dir: PathBuf,
    nodes: Vec<Option<Child>>,
    owned: bool,
    /// More `redis-server` options for every node.
    extra: String,
    /// The nodes' password (`requirepass`), if any.
    password: Option<String>,
    /// The directory of the TLS files when the nodes speak TLS only ([`Self::tls`]).
    tls: Option<PathBuf>,
}

/// The TLS files of a cluster started by [`RedisCluster::start_with_tls`]: PEM files
/// made by `openssl` for the test.
pub struct TlsFiles {
    /// The authority that signed the nodes' and the client's certificates.
    pub ca: PathBuf,
    /// A client certificate it signed, and its key.
    pub client_cert: PathBuf,
    pub client_key: PathBuf,
    /// Another authority, which signed nothing here.
    pub other_ca: PathBuf,
}

/// The nodes' options to announce the hostname `localhost` and have clients use it.
const HOSTNAMES: &str =
    "--cluster-announce-hostname localhost --cluster-preferred-endpoint-type hostname";

fn free_port_pair() -> u16 {
    // Ports handed out before, by this test process: a port is free between the
    // probe and the node's bind, so two clusters started together (or two nodes of
    // one) could be given the same one. The second node then fails to bind, its
    // watchdog writes its pid over the first's, and the first outlives the test.
    static GIVEN: std::sync::Mutex<Vec<u16>> = std::sync::Mutex::new(Vec::new());
    let mut given = GIVEN.lock().unwrap_or_else(|e| e.into_inner());
    // The cluster bus listens on port + 10000. Both stay under Linux's ephemeral
    // range (32768 and up), where the port of an outgoing connection could take
    // them between the probe and the bind.
    loop {
        let p = 12000 + (rand::random::<u16>() % 10000);
        if !given.contains(&p)
            && TcpListener::bind(("127.0.0.1", p)).is_ok()
            && TcpListener::bind(("127.0.0.1", p + 10000)).is_ok()
        {
            given.push(p);
            return p;
        }
    }
}

/// The port of a `CLUSTER NODES` address field (`host:port@bus`).
fn node_port(address: &str) -> Option<u16> {
    address.split('@').next()?.rsplit_once(':')?.1.parse().ok()
}

/// A hash slot on its way from one primary to another ([`RedisCluster::begin_move`]).
pub struct SlotMove {
    slot: String,
    from: u16,
    to: u16,
    from_id: String,
    to_id: String,
}

impl RedisCluster {
    /// `redis-cli` on the node at `port` (as the cluster's password's user). A node
    /// that takes the connection and answers nothing (frozen by [`Self::freeze`])
    /// fails the test after 30 s instead of holding it for ever.
    fn redis_cli(&self, port: u16, args: &[&str]) -> String {
        let out = Command::new("timeout")
            .arg("30")
            .arg("redis-cli")
            .envs(self.auth())
            .args(self.tls_args())
            .args(["-p", &port.to_string()])
            .args(args)
            .output()
            .expect("redis-cli (Debian's redis-tools; the test command installs it)");
        // `timeout`'s status when the time ran out.
        assert_ne!(
            out.status.code(),
            Some(124),
            "redis-cli {args:?} on port {port}: no answer in 30 s (a frozen node?)"
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// `redis-cli`'s password, when the nodes have one (`REDISCLI_AUTH`: not on its
    /// command line, and no warning about it).
    fn auth(&self) -> Option<(&'static str, &str)> {
        self.password.as_deref().map(|p| ("REDISCLI_AUTH", p))
    }

    /// `redis-cli`'s options for TLS, when the nodes speak TLS only.
    fn tls_args(&self) -> Vec<String> {
        let Some(dir) = &self.tls else {
            return Vec::new();
        };
        let f = |name: &str| dir.join(name).display().to_string();
        vec![
            "--tls".into(),
            "--cacert".into(),
            f("ca.crt"),
            "--cert".into(),
            f("client.crt"),
            "--key".into(),
            f("client.key"),
        ]
    }

    /// Checks that the nodes name themselves `localhost` where clients route
    /// (`CLUSTER SLOTS`), as [`Self::start_announcing_hostnames`] asks.
    pub fn assert_announces_hostnames(&self) {
        let slots = self.cli(self.ports[0], &["CLUSTER", "SLOTS"]);
        assert!(slots.contains("localhost"), "CLUSTER SLOTS: {slots}");
    }

    /// The TLS files of a cluster started by [`Self::start_with_tls`].
    pub fn tls_files(&self) -> TlsFiles {
        let dir = self.tls.as_ref().expect("a cluster with TLS");
        TlsFiles {
            ca: dir.join("ca.crt"),
            client_cert: dir.join("client.crt"),
            client_key: dir.join("client.key"),
            other_ca: dir.join("other-ca.crt"),
        }
    }

    /// Moves the nodes of a cluster started by [`Self::start_with_tls`] to a new
    /// authority, as a renewal of their certificates would: every node first trusts
    /// clients of both (`tls-ca-cert-file`), then presents a certificate of the new
    /// one (`tls-cert-file`, `tls-key-file`) on every connection made from then on.
    /// Returns the new authority's files (its client certificate included), which
    /// [`Self::tls_files`] and the cluster's own `redis-cli` use from then on.
    pub fn renew_tls(&mut self) -> TlsFiles {
        let old = self.tls.clone().expect("a cluster with TLS");
        let next = make_tls_files(&self.dir.join(format!("tls-{}", rand::random::<u32>())));
        let mut both = std::fs::read(old.join("ca.crt")).unwrap();
        both.extend(std::fs::read(next.join("ca.crt")).unwrap());
        let both_path = next.join("both-ca.crt");
        std::fs::write(&both_path, both).unwrap();
        let path = |p: &Path| p.display().to_string();
        for &port in &self.ports {
            let ok = self.redis_cli(
                port,
                &["CONFIG", "SET", "tls-ca-cert-file", &path(&both_path)],
            );
            assert!(ok.contains("OK"), "tls-ca-cert-file on {port}: {ok}");
        }
        for &port in &self.ports {
            let ok = self.redis_cli(
                port,
                &[
                    "CONFIG",
                    "SET",
                    "tls-cert-file",
                    &path(&next.join("node.crt")),
                    "tls-key-file",
                    &path(&next.join("node.key")),
                ],
            );
            assert!(ok.contains("OK"), "tls-cert-file on {port}: {ok}");
        }
        self.tls = Some(next);
        self.tls_files()
    }

    /// Starts `primaries` primaries with `replicas` replicas each. `aof`: with the
    /// append-only file on (fsync every second), so a restart keeps the data.
    pub fn start(primaries: usize, replicas: usize, aof: bool) -> RedisCluster {
        Self::start_with(primaries, replicas, aof, "", None, false)
    }

    /// A cluster that speaks TLS only, between its nodes too (`tls-port`,
    /// `tls-cluster`, `tls-replication`), and wants a certificate from every client
    /// (`tls-auth-clients yes`): the authority, the nodes' certificate (for
    /// `127.0.0.1` and `localhost`) and a client's are made by `openssl`
    /// ([`Self::tls_files`]).
    pub fn start_with_tls(primaries: usize, replicas: usize) -> RedisCluster {
        Self::start_with(primaries, replicas, false, "", None, true)
    }

    /// [`Self::start_with_tls`] with nodes that announce the hostname `localhost`
    /// ([`Self::start_announcing_hostnames`]), which their certificate names: how
    /// clusters with TLS in Kubernetes are set up.
    pub fn start_with_tls_announcing_hostnames(primaries: usize, replicas: usize) -> RedisCluster {
        Self::start_with(primaries, replicas, false, HOSTNAMES, None, true)
    }

    /// A cluster whose nodes want `password` from every client (`requirepass`, and
    /// `masterauth` for the replicas).
    pub fn start_with_password(primaries: usize, replicas: usize, password: &str) -> RedisCluster {
        Self::start_with(
            primaries,
            replicas,
            false,
            &format!("--requirepass {password} --masterauth {password}"),
            Some(password),
            false,
        )
    }

    /// A cluster whose nodes announce the hostname `localhost` and ask clients to
    /// connect to that (`cluster-preferred-endpoint-type hostname`, as deployments
    /// with TLS or Kubernetes do): `CLUSTER SLOTS`, which clients route by, names
    /// `localhost`, while `CLUSTER NODES` still names the IP.
    pub fn start_announcing_hostnames(primaries: usize, replicas: usize) -> RedisCluster {
        Self::start_with(primaries, replicas, false, HOSTNAMES, None, false)
    }

    fn start_with(
        primaries: usize,
        replicas: usize,
        aof: bool,
        extra: &str,
        password: Option<&str>,
        tls: bool,
    ) -> RedisCluster {
        let dir = std::env::temp_dir().join(format!(
            "netswap-redis-{}-{}",
            std::process::id(),
            rand::random::<u32>()
        ));
        std::fs::create_dir_all(&dir).unwrap();
        let tls = tls.then(|| make_tls_files(&dir.join("tls")));
        let n = primaries * (1 + replicas);
        let ports: Vec<u16> = (0..n).map(|_| free_port_pair()).collect();
        let mut c = RedisCluster {
            ports,
            dir,
            nodes: Vec::new(),
            owned: true,
            extra: extra.to_string(),
            password: password.map(str::to_string),
            tls,
        };
        for i in 0..n {
            let child = c.spawn_node(i, aof);
            c.nodes.push(Some(child));
        }
        for &p in &c.ports {
            wait_until(Duration::from_secs(10), || {
                c.redis_cli(p, &["PING"]).trim() == "PONG"
            });
        }
        let addrs: Vec<String> = c.ports.iter().map(|p| format!("127.0.0.1:{p}")).collect();
        let mut args = vec!["--cluster".to_string(), "create".to_string()];
        args.extend(addrs);
        args.extend([
            "--cluster-replicas".into(),
            replicas.to_string(),
            "--cluster-yes".into(),
        ]);
        // `timeout`: a node that does not answer fails the test (status 124).
        let out = Command::new("timeout")
            .args(["120", "redis-cli"])
            .envs(c.auth())
            .args(c.tls_args())
            .args(&args)
            .output()
            .expect("redis-cli --cluster create");
        assert!(
            out.status.success(),
            "redis-cli --cluster create failed ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stdout)
        );
        c.wait_healthy();
        c
    }

    fn spawn_node(&self, i: usize, aof: bool) -> Child {
        let port = self.ports[i];
        let dir = self.dir.join(port.to_string());
        std::fs::create_dir_all(&dir).unwrap();
        // With TLS, the port is TLS's, and so is the cluster bus (port + 10000).
        let listen = match &self.tls {
            None => format!("--port {port}"),
            Some(tls) => format!(
                "--port 0 --tls-port {port} --tls-cluster yes --tls-replication yes \
                 --tls-cert-file {t}/node.crt --tls-key-file {t}/node.key \
                 --tls-ca-cert-file {t}/ca.crt --tls-auth-clients yes",
                t = tls.display()
            ),
        };
        let redis = format!(
            "redis-server {listen} --bind 127.0.0.1 --cluster-enabled yes \
             --cluster-config-file nodes.conf --cluster-node-timeout 1500 \
             --appendonly {aof} --appendfsync everysec --save '' --dir {dir} \
             --logfile {dir}/log.txt --cluster-require-full-coverage no {extra}",
            aof = if aof { "yes" } else { "no" },
            dir = dir.display(),
            extra = self.extra
        );
        // The watchdog: when the test process is gone, the node goes too, and so do
        // its files (the cluster shared by a test binary is never dropped: its
        // directories stayed in /tmp after every run).
        let script = format!(
            "{redis} & node=$!; echo $node > {dir}/pid; trap 'kill -9 $node 2>/dev/null' TERM; \
             while kill -0 {parent} 2>/dev/null && kill -0 $node 2>/dev/null; do sleep 0.5; done; \
             kill -9 $node 2>/dev/null; wait; \
             kill -0 {parent} 2>/dev/null || {{ rm -rf {dir}; rmdir {top} 2>/dev/null; }}",
            parent = std::process::id(),
            dir = dir.display(),
            top = self.dir.display()
        );
        Command::new("sh")
            .args(["-c", &script])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("sh")
    }

    /// `host:port,...` of every node.
    pub fn nodes(&self) -> Vec<String> {
        self.ports
            .iter()
            .map(|p| format!("127.0.0.1:{p}"))
            .collect()
    }

    /// Waits until every slot is served, every live node agrees, every replica is in
    /// sync with its primary, and every node knows each node as a primary serving
    /// slots or as a replica (gossip tells a replica's role a little after the
    /// cluster is created: until then `replicas_of` finds none).
    pub fn wait_healthy(&self) {
        wait_until(Duration::from_secs(30), || {
            self.live_ports().iter().all(|&p| {
                let info = self.redis_cli(p, &["CLUSTER", "INFO"]);
                let repl = self.redis_cli(p, &["INFO", "replication"]);
                let roles_known = self
                    .redis_cli(p, &["CLUSTER", "NODES"])
                    .lines()
                    .map(|l| l.split_whitespace().collect::<Vec<_>>())
                    .filter(|f| f.len() > 2 && !f[2].contains("fail"))
                    .all(|f| f[2].contains("slave") || f.len() > 8);
                info.contains("cluster_state:ok")
                    && info.contains("cluster_slots_ok:16384")
                    && (repl.contains("role:master") || repl.contains("master_link_status:up"))
                    && roles_known
            })
        });
    }

    fn live_ports(&self) -> Vec<u16> {
        self.ports
            .iter()
            .enumerate()
            .filter(|(i, _)| !self.owned || self.nodes.get(*i).is_some_and(|n| n.is_some()))
            .map(|(_, p)| *p)
            .collect()
    }

    /// The port of the primary serving `key`.
    pub fn primary_of(&self, key: &str) -> u16 {
        let any = self.live_ports()[0];
        let slot: u16 = self
            .redis_cli(any, &["CLUSTER", "KEYSLOT", key])
            .trim()
            .parse()
            .unwrap();
        for line in self.redis_cli(any, &["CLUSTER", "NODES"]).lines() {
            let f: Vec<&str> = line.split_whitespace().collect();
            if f.len() < 9 || !f[2].contains("master") || f[2].contains("fail") {
                continue;
            }
            let port = node_port(f[1]).unwrap();
            for range in &f[8..] {
                let (a, b) = match range.split_once('-') {
                    Some((a, b)) => (a.parse::<u16>().unwrap_or(1), b.parse::<u16>().unwrap_or(0)),
                    None => match range.parse::<u16>() {
                        Ok(x) => (x, x),
                        Err(_) => continue,
                    },
                };
                if (a..=b).contains(&slot) {
                    return port;
                }
            }
        }
        panic!("no primary serves slot {slot}");
    }

    /// Moves the hash slot of `key` to the primary on `to` (as `redis-cli --cluster
    /// reshard` does, one slot): marks it importing and migrating, `MIGRATE`s its keys,
    /// then tells every primary the slot's new owner.
    pub fn move_slot_of(&self, key: &str, to: u16) {
        let m = self.begin_move(key, to);
        self.migrate_keys(&m);
        self.finish_move(&m);
    }

    /// How many hash slots the primary on `port` serves.
    pub fn slot_count(&self, port: u16) -> usize {
        self.slots_of(port).len()
    }

    /// The hash slots the primary on `port` serves.
    pub fn slots_of(&self, port: u16) -> Vec<u16> {
        let me = self
            .redis_cli(port, &["CLUSTER", "MYID"])
            .trim()
            .to_string();
        self.redis_cli(port, &["CLUSTER", "NODES"])
            .lines()
            .map(|l| l.split_whitespace().collect::<Vec<_>>())
            .filter(|f| f.len() > 8 && f[0] == me)
            .flat_map(|f| f[8..].iter().map(|r| r.to_string()).collect::<Vec<_>>())
            .filter(|r| !r.starts_with('['))
            .flat_map(|r| match r.split_once('-') {
                Some((a, b)) => a.parse::<u16>().unwrap()..=b.parse::<u16>().unwrap(),
                None => r.parse::<u16>().unwrap()..=r.parse::<u16>().unwrap(),
            })
            .collect()
    }

    /// Moves `slots` hash slots from the primary on `from` to the one on `to` with
    /// the operator's tool (`redis-cli --cluster reshard`), until it is done.
    pub fn reshard(&self, from: u16, to: u16, slots: usize) {
        let id = |p: u16| self.redis_cli(p, &["CLUSTER", "MYID"]).trim().to_string();
        let out = Command::new("timeout")
            .args(["120", "redis-cli"])
            .envs(self.auth())
            .args(self.tls_args())
            .args(["--cluster", "reshard", &format!("127.0.0.1:{from}")])
            .args(["--cluster-from", &id(from), "--cluster-to", &id(to)])
            .args(["--cluster-slots", &slots.to_string(), "--cluster-yes"])
            .output()
            .expect("redis-cli");
        assert!(
            out.status.success(),
            "redis-cli --cluster reshard ({}): {}{}",
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }

    /// Starts moving the hash slot of `key` to the primary on `to`: the slot is
    /// importing there and migrating here, no key has moved yet.
    pub fn begin_move(&self, key: &str, to: u16) -> SlotMove {
        let from = self.primary_of(key);
        assert_ne!(from, to, "the slot is on {to} already");
        let slot = self
            .redis_cli(from, &["CLUSTER", "KEYSLOT", key])
            .trim()
            .parse()
            .unwrap();
        self.begin_moves(from, to, [slot]).pop().unwrap()
    }

    /// Starts moving `slots` (served by the primary on `from`) to the primary on `to`.
    pub fn begin_moves(
        &self,
        from: u16,
        to: u16,
        slots: impl IntoIterator<Item = u16>,
    ) -> Vec<SlotMove> {
        let id = |p: u16| self.redis_cli(p, &["CLUSTER", "MYID"]).trim().to_string();
        let (from_id, to_id) = (id(from), id(to));
        slots
            .into_iter()
            .map(|slot| {
                let m = SlotMove {
                    slot: slot.to_string(),
                    from,
                    to,
                    from_id: from_id.clone(),
                    to_id: to_id.clone(),
                };
                self.redis_cli(
                    to,
                    &["CLUSTER", "SETSLOT", &m.slot, "IMPORTING", &m.from_id],
                );
                self.redis_cli(
                    from,
                    &["CLUSTER", "SETSLOT", &m.slot, "MIGRATING", &m.to_id],
                );
                m
            })
            .collect()
    }

    /// `MIGRATE`s every key of a slot being moved to its new primary (the slot stays
    /// migrating: requests for its keys are redirected with `ASK`).
    pub fn migrate_keys(&self, m: &SlotMove) {
        loop {
            let keys = self.redis_cli(m.from, &["CLUSTER", "GETKEYSINSLOT", &m.slot, "100"]);
            let keys: Vec<&str> = keys.lines().filter(|k| !k.is_empty()).collect();
            if keys.is_empty() {
                break;
            }
            let to_port = m.to.to_string();
            let mut args = vec!["MIGRATE", "127.0.0.1", &to_port, "", "0", "5000", "KEYS"];
            args.extend(keys);
            let out = self.redis_cli(m.from, &args);
            assert!(out.contains("OK"), "MIGRATE: {out}");
        }
    }

    /// Ends a move: every primary learns the slot's new owner.
    pub fn finish_move(&self, m: &SlotMove) {
        for p in self.live_ports() {
            self.redis_cli(p, &["CLUSTER", "SETSLOT", &m.slot, "NODE", &m.to_id]);
        }
    }

    /// A plain connection to the primary serving `key`, for commands whose
    /// arguments or replies are binary (which `redis-cli` would mangle).
    pub fn primary_connection(&self, key: &str) -> redis::Connection {
        let auth = self
            .password
            .as_deref()
            .map(|p| format!(":{p}@"))
            .unwrap_or_default();
        redis::Client::open(format!("redis://{auth}127.0.0.1:{}", self.primary_of(key)))
            .and_then(|c| c.get_connection())
            .expect("a connection to the key's primary")
    }

    /// The fields of hash `key` (`HGETALL` on its primary; values as text, lossily:
    /// a record's packed state is binary).
    pub fn hgetall(&self, key: &str) -> std::collections::HashMap<String, String> {
        let fields: std::collections::HashMap<String, Vec<u8>> = redis::cmd("HGETALL")
            .arg(key)
            .query(&mut self.primary_connection(key))
            .expect("HGETALL");
        fields
            .into_iter()
            .map(|(f, v)| (f, String::from_utf8_lossy(&v).into_owned()))
            .collect()
    }

    /// The keys of a slot being moved that are on its old node and on its new one
    /// (`CLUSTER GETKEYSINSLOT` on each: up to 1,000).
    pub fn keys_of_move(&self, m: &SlotMove) -> (Vec<String>, Vec<String>) {
        let keys = |port| {
            self.redis_cli(port, &["CLUSTER", "GETKEYSINSLOT", &m.slot, "1000"])
                .lines()
                .filter(|k| !k.is_empty())
                .map(str::to_string)
                .collect()
        };
        (keys(m.from), keys(m.to))
    }

    /// Whether `key` exists (`EXISTS` on its primary).
    pub fn exists(&self, key: &str) -> bool {
        self.redis_cli(self.primary_of(key), &["EXISTS", key])
            .trim()
            == "1"
    }

    /// Runs a command on the node at `port` (`redis-cli`'s output).
    pub fn cli(&self, port: u16, args: &[&str]) -> String {
        self.redis_cli(port, args)
    }

    /// How many scripts the node at `port` holds (`INFO memory`).
    pub fn scripts_on(&self, port: u16) -> u64 {
        self.info_sum_on(&[port], "memory", "number_of_cached_scripts:")
    }

    /// Empties every live node's script cache (`SCRIPT FLUSH`).
    pub fn flush_scripts(&self) {
        for p in self.live_ports() {
            self.redis_cli(p, &["SCRIPT", "FLUSH"]);
        }
    }

    /// The sum over the live nodes of the number after `prefix` on a line of
    /// `INFO section` (up to a comma: `cmdstat_get:calls=7,usec=…`).
    fn info_sum(&self, section: &str, prefix: &str) -> u64 {
        self.info_sum_on(&self.live_ports(), section, prefix)
    }

    fn info_sum_on(&self, ports: &[u16], section: &str, prefix: &str) -> u64 {
        ports
            .iter()
            .map(|&p| {
                self.redis_cli(p, &["INFO", section])
                    .lines()
                    .find_map(|l| l.strip_prefix(prefix))
                    .and_then(|rest| rest.split(',').next()?.trim().parse::<u64>().ok())
                    .unwrap_or(0)
            })
            .sum()
    }

    /// How many error replies of kind `kind` (e.g. `MOVED`) the live nodes gave, from
    /// `INFO errorstats`.
    pub fn errors(&self, kind: &str) -> u64 {
        self.info_sum("errorstats", &format!("errorstat_{kind}:count="))
    }

    /// Bytes the live nodes have sent to their clients (`INFO stats`
    /// `total_net_output_bytes`: replies, not replication or the cluster bus).
    pub fn net_output_bytes(&self) -> u64 {
        self.info_sum("stats", "total_net_output_bytes:")
    }

    /// How many times the live nodes ran `command` (lowercase, e.g. `evalsha`), from
    /// `INFO commandstats`.
    pub fn calls(&self, command: &str) -> u64 {
        self.info_sum("commandstats", &format!("cmdstat_{command}:calls="))
    }

    /// How many times the node on `port` ran `command` (as [`RedisCluster::calls`]).
    pub fn calls_on(&self, port: u16, command: &str) -> u64 {
        self.info_sum_on(
            &[port],
            "commandstats",
            &format!("cmdstat_{command}:calls="),
        )
    }

    /// The ports of the primaries (from `CLUSTER NODES`).
    pub fn primaries(&self) -> Vec<u16> {
        self.redis_cli(self.live_ports()[0], &["CLUSTER", "NODES"])
            .lines()
            .map(|l| l.split_whitespace().collect::<Vec<_>>())
            .filter(|f| f.len() > 2 && f[2].contains("master") && !f[2].contains("fail"))
            .filter_map(|f| node_port(f[1]))
            .collect()
    }

    /// The ports of the replicas of the primary on `port` (from `CLUSTER NODES`).
    pub fn replicas_of(&self, port: u16) -> Vec<u16> {
        let nodes = self.redis_cli(self.live_ports()[0], &["CLUSTER", "NODES"]);
        let rows: Vec<Vec<&str>> = nodes
            .lines()
            .map(|l| l.split_whitespace().collect::<Vec<_>>())
            .filter(|f| f.len() > 3)
            .collect();
        let Some(id) = rows
            .iter()
            .find(|f| node_port(f[1]) == Some(port))
            .map(|f| f[0])
        else {
            return Vec::new();
        };
        rows.iter()
            .filter(|f| f[3] == id)
            .filter_map(|f| node_port(f[1]))
            .collect()
    }

    /// How many clients of the node on `port` are subscribed to the shard channel
    /// `channel` (`PUBSUB SHARDNUMSUB`, which counts the node's own clients only).
    pub fn shard_subscribers_on(&self, port: u16, channel: &str) -> u64 {
        self.redis_cli(port, &["PUBSUB", "SHARDNUMSUB", channel])
            .lines()
            .nth(1)
            .and_then(|n| n.trim().parse().ok())
            .unwrap_or(0)
    }

    /// Kills the node on `port` with SIGKILL.
    pub fn kill(&mut self, port: u16) {
        let i = self.ports.iter().position(|&p| p == port).expect("a node");
        if let Some(mut child) = self.nodes[i].take() {
            self.signal(port, "-KILL");
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Kills every node (SIGKILL).
    pub fn kill_all(&mut self) {
        for p in self.ports.clone() {
            self.kill(p);
        }
    }

    /// Freezes (`frozen`: SIGSTOP) or thaws (SIGCONT) every running node: a cluster
    /// that takes connections and answers nothing, as behind a network partition.
    pub fn freeze_all(&self, frozen: bool) {
        for (i, port) in self.ports.iter().enumerate() {
            if self.nodes[i].is_some() {
                self.freeze(*port, frozen);
            }
        }
    }

    /// Freezes (SIGSTOP) or thaws (SIGCONT) the node on `port`.
    pub fn freeze(&self, port: u16, frozen: bool) {
        let signal = if frozen { "-STOP" } else { "-CONT" };
        assert!(
            self.signal(port, signal),
            "kill {signal} the node on port {port}"
        );
    }

    /// Sends `signal` (`kill`'s option, e.g. `-KILL`) to the Redis node on `port`
    /// (its pid is in its pid file: the child is the node's watchdog shell). Whether
    /// it was delivered.
    fn signal(&self, port: u16, signal: &str) -> bool {
        std::fs::read_to_string(self.dir.join(port.to_string()).join("pid")).is_ok_and(|pid| {
            Command::new("kill")
                .args([signal, pid.trim()])
                .status()
                .is_ok_and(|s| s.success())
        })
    }

    /// Starts every killed node again (from its AOF and nodes.conf).
    pub fn restart_killed(&mut self, aof: bool) {
        for i in 0..self.ports.len() {
            if self.nodes[i].is_none() {
                let child = self.spawn_node(i, aof);
                self.nodes[i] = Some(child);
            }
        }
        for &p in &self.ports {
            wait_until(Duration::from_secs(10), || {
                self.redis_cli(p, &["PING"]).trim() == "PONG"
            });
        }
        self.wait_healthy();
    }

    fn shared_from_env() -> Option<RedisCluster> {
        let nodes = std::env::var("NETSWAP_TEST_REDIS_CLUSTER").ok()?;
        let ports = nodes
            .split(',')
            .filter_map(|n| n.rsplit_once(':')?.1.parse().ok())
            .collect();
        Some(RedisCluster {
            ports,
            dir: PathBuf::new(),
            nodes: Vec::new(),
            owned: false,
            extra: String::new(),
            password: None,
            tls: None,
        })
    }
}

impl Drop for RedisCluster {
    fn drop(&mut self) {
        if self.owned {
            self.kill_all();
            let _ = std::fs::remove_dir_all(&self.dir);
        }
    }
}

/// The cluster the conformance tests share: the test command's, or one started for
/// this test binary (stopped by its watchdogs when the binary exits).
pub fn shared() -> &'static RedisCluster {
    static SHARED: OnceLock<RedisCluster> = OnceLock::new();
    SHARED.get_or_init(|| {
        RedisCluster::shared_from_env().unwrap_or_else(|| RedisCluster::start(3, 1, false))
    })
}

/// Makes, in `dir`, a test authority (`ca.crt`), a node certificate it signs for
/// `127.0.0.1` and `localhost` (`node.crt`, `node.key`), a client certificate it
/// signs (`client.crt`, `client.key`), and another authority that signs nothing
/// (`other-ca.crt`), with `openssl` (P-256 keys, valid for a day).
fn make_tls_files(dir: &std::path::Path) -> PathBuf {
    std::fs::create_dir_all(dir).unwrap();
    let script = r#"set -e
key() { openssl genpkey -algorithm EC -pkeyopt ec_paramgen_curve:P-256 -out "$1" 2>/dev/null; }
key ca.key; key other-ca.key; key node.key; key client.key
openssl req -x509 -new -key ca.key -subj /CN=netswap-test-ca -days 1 -out ca.crt
openssl req -x509 -new -key other-ca.key -subj /CN=someone-else -days 1 -out other-ca.crt
openssl req -new -key node.key -subj /CN=localhost -out node.csr
printf 'subjectAltName=IP:127.0.0.1,DNS:localhost
extendedKeyUsage=serverAuth,clientAuth
' > node.ext
openssl x509 -req -in node.csr -CA ca.crt -CAkey ca.key -CAcreateserial -days 1 -extfile node.ext -out node.crt 2>/dev/null
openssl req -new -key client.key -subj /CN=netswap-gateway -out client.csr
printf 'extendedKeyUsage=clientAuth
' > client.ext
openssl x509 -req -in client.csr -CA ca.crt -CAkey ca.key -CAcreateserial -days 1 -extfile client.ext -out client.crt 2>/dev/null
"#;
    let out = Command::new("sh")
        .args(["-c", script])
        .current_dir(dir)
        .output()
        .expect("openssl (Debian's openssl; the test command installs it)");
    assert!(
        out.status.success(),
        "making the TLS files failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    dir.to_path_buf()
}

fn wait_until(limit: Duration, mut ok: impl FnMut() -> bool) {
    let start = Instant::now();
    while !ok() {
        assert!(
            start.elapsed() < limit,
            "Redis Cluster not ready within {limit:?}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}
