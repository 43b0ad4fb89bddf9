//! The server state behind one lock: the tree, the connections with their
//! watches and transactions, and the domains; and `process_message()`, which
//! checks a request's type, privilege and transaction as xenstored does and
//! runs it.

use std::collections::{BTreeMap, HashMap};
use std::os::unix::net::UnixStream;
use std::sync::Arc;

use xs_wire::{Message, MsgType, XsErrno, XENSTORE_PAYLOAD_MAX};

use super::config::XenstoredConfig;
use super::conn::OutQueue;
use super::node::{Caller, Store, Tree};
use super::ops::{atoi, canonicalize, home_path, onearg, strings, Op, ACK};
use super::transaction::Transaction;
use super::watch::{Fire, Watch};

/// A connection's id, unique for the server's lifetime.
pub type ConnId = u64;

/// `DOMID_SELF`, always introduced.
const DOMID_SELF: u32 = 0x7ff0;
/// `XENSTORE_REL_PATH_MAX`: longest special watch path.
const REL_PATH_MAX: usize = 2048;

/// One connection: its domain, watches, transactions and output.
pub struct ConnState {
    /// Domain the connection acts as.
    pub domid: u32,
    /// Whether it is privileged (socket connections and dom0).
    pub privileged: bool,
    /// Registered watches, in registration order.
    pub watches: Vec<Watch>,
    /// Open transactions by id.
    pub transactions: HashMap<u32, Transaction>,
    next_tx: u32,
    /// Replies and events waiting to be written.
    pub out: Arc<OutQueue>,
    /// A handle to shut the connection down.
    pub stream: UnixStream,
    /// The socket server that accepted it, if any.
    pub server: Option<u64>,
}

impl ConnState {
    /// A connection with no watches or transactions.
    pub fn new(domid: u32, privileged: bool, out: Arc<OutQueue>, stream: UnixStream, server: Option<u64>) -> Self {
        ConnState {
            domid,
            privileged,
            watches: Vec::new(),
            transactions: HashMap::new(),
            next_tx: 1,
            out,
            stream,
            server,
        }
    }
}

/// What xenstored knows of a domain.
#[derive(Clone, Debug, Default)]
struct DomainInfo {
    introduced: bool,
    target: Option<u32>,
}

/// The whole server state.
pub struct State {
    /// The committed tree.
    pub tree: Tree,
    /// Live connections.
    pub conns: BTreeMap<ConnId, ConnState>,
    domains: BTreeMap<u32, DomainInfo>,
    /// Quotas and limits.
    pub config: XenstoredConfig,
    /// Watch events queued so far.
    pub events_sent: u64,
    /// Watch events dropped because a connection's queue was full.
    pub events_dropped: u64,
}

/// The result of a request: the reply payload, the changes that fire
/// watches before it, and an event for the requester after it (the first
/// firing of a new watch).
struct Outcome {
    reply: Vec<u8>,
    fires: Vec<Fire>,
    after: Option<Vec<u8>>,
}

impl Outcome {
    fn reply(reply: Vec<u8>) -> Self {
        Outcome { reply, fires: Vec::new(), after: None }
    }
}

fn event_message(payload: Vec<u8>) -> Message {
    Message { msg_type: MsgType::WATCH_EVENT, req_id: 0, tx_id: 0, payload }
}

fn with_nul(s: &str) -> Vec<u8> {
    let mut v = s.as_bytes().to_vec();
    v.push(0);
    v
}

impl State {
    /// The initial state: `setup_structure()`'s tree and dom0 introduced.
    pub fn new(config: XenstoredConfig) -> Self {
        let mut domains = BTreeMap::new();
        domains.insert(0, DomainInfo { introduced: true, target: None });
        State { tree: Tree::new(), conns: BTreeMap::new(), domains, config, events_sent: 0, events_dropped: 0 }
    }

    fn caller(&self, id: ConnId) -> Caller {
        let c = &self.conns[&id];
        let target = self.domains.get(&c.domid).and_then(|d| d.target);
        Caller { domid: c.domid, privileged: c.privileged, target }
    }

    /// Forgets a connection: its watches and transactions go with it.
    pub fn remove_conn(&mut self, id: ConnId) -> Option<ConnState> {
        self.conns.remove(&id)
    }

    /// `process_message()`: runs `msg` from connection `id` and queues the
    /// reply (with the request's ids) and every watch event it causes.
    pub fn process(&mut self, id: ConnId, msg: &Message) {
        if !self.conns.contains_key(&id) {
            return;
        }
        let reply = match self.execute(id, msg) {
            Ok(out) => {
                self.fire(&out.fires);
                let reply = if out.reply.len() > XENSTORE_PAYLOAD_MAX {
                    Message::error_reply(msg.req_id, msg.tx_id, XsErrno::E2BIG)
                } else {
                    Message { msg_type: msg.msg_type, req_id: msg.req_id, tx_id: msg.tx_id, payload: out.reply }
                };
                self.push_reply(id, reply);
                if let Some(ev) = out.after {
                    self.push_event(id, event_message(ev));
                }
                return;
            }
            Err(e) => Message::error_reply(msg.req_id, msg.tx_id, e),
        };
        log::debug!("xenstored: conn {id} {:?} -> {:?}", msg.msg_type, reply.as_error());
        self.push_reply(id, reply);
    }

    fn push_reply(&mut self, id: ConnId, msg: Message) {
        if let Some(c) = self.conns.get(&id) {
            c.out.push_reply(&msg);
        }
    }

    fn push_event(&mut self, id: ConnId, msg: Message) {
        if let Some(c) = self.conns.get(&id) {
            if c.out.push_event(&msg) {
                self.events_sent += 1;
            } else {
                self.events_dropped += 1;
            }
        }
    }

    /// `fire_watches()` for each change, in order.
    pub fn fire(&mut self, fires: &[Fire]) {
        for fire in fires {
            let special = fire.path.starts_with('@').then(|| self.tree.get(&fire.path).map(|n| n.perms.clone()));
            let mut events = Vec::new();
            for (&id, c) in &self.conns {
                let caller = self.caller(id);
                let allowed = match &special {
                    Some(perms) => perms.as_ref().is_some_and(|p| caller.can_read(p)),
                    None => fire.permitted(&caller),
                };
                if !allowed {
                    continue;
                }
                for w in c.watches.iter().filter(|w| w.matches(fire)) {
                    if let Some(payload) = w.event_payload(&fire.path) {
                        events.push((id, payload));
                    }
                }
            }
            for (id, payload) in events {
                self.push_event(id, event_message(payload));
            }
        }
    }

    fn execute(&mut self, id: ConnId, msg: &Message) -> Result<Outcome, XsErrno> {
        let t = msg.msg_type;
        if !t.is_valid() || t.0 >= MsgType::GET_FEATURE.0 || t == MsgType::WATCH_EVENT || t == MsgType::ERROR {
            log::info!("xenstored: conn {id}: unknown operation {}", t.0);
            return Err(XsErrno::ENOSYS);
        }
        let caller = self.caller(id);
        let privileged_only = matches!(
            t,
            MsgType::CONTROL
                | MsgType::INTRODUCE
                | MsgType::RELEASE
                | MsgType::IS_DOMAIN_INTRODUCED
                | MsgType::RESUME
                | MsgType::SET_TARGET
        );
        if privileged_only && !caller.privileged {
            return Err(XsErrno::EACCES);
        }
        let notid = matches!(t, MsgType::WATCH | MsgType::UNWATCH);
        let tx = if notid || msg.tx_id == 0 {
            None
        } else if self.conns[&id].transactions.contains_key(&msg.tx_id) {
            Some(msg.tx_id)
        } else {
            return Err(XsErrno::ENOENT);
        };
        let p = &msg.payload;
        match t {
            MsgType::READ => self.tree_op(id, caller, tx, |op| op.read(p)),
            MsgType::DIRECTORY => self.tree_op(id, caller, tx, |op| op.directory(p)),
            MsgType::DIRECTORY_PART => self.tree_op(id, caller, tx, |op| op.directory_part(p)),
            MsgType::GET_PERMS => self.tree_op(id, caller, tx, |op| op.get_perms(p)),
            MsgType::WRITE => self.tree_op(id, caller, tx, |op| op.write(p)),
            MsgType::MKDIR => self.tree_op(id, caller, tx, |op| op.mkdir(p)),
            MsgType::RM => self.tree_op(id, caller, tx, |op| op.rm(p)),
            MsgType::SET_PERMS => self.tree_op(id, caller, tx, |op| op.set_perms(p)),
            MsgType::WATCH => self.watch(id, caller, p),
            MsgType::UNWATCH => self.unwatch(id, caller, p),
            MsgType::TRANSACTION_START => self.transaction_start(id, caller, tx),
            MsgType::TRANSACTION_END => self.transaction_end(id, tx, p),
            MsgType::INTRODUCE => self.introduce(p),
            MsgType::RELEASE => {
                let domid = self.onearg_domain(p)?;
                Ok(Outcome { reply: ACK.to_vec(), fires: self.release(domid), after: None })
            }
            MsgType::RESUME => self.onearg_domain(p).map(|_| Outcome::reply(ACK.to_vec())),
            MsgType::SET_TARGET => self.set_target(p),
            MsgType::GET_DOMAIN_PATH => {
                let d = onearg(p).ok_or(XsErrno::EINVAL)?;
                Ok(Outcome::reply(with_nul(&home_path(atoi(d) as u32))))
            }
            MsgType::IS_DOMAIN_INTRODUCED => {
                let d = atoi(onearg(p).ok_or(XsErrno::EINVAL)?) as u32;
                let yes = d == DOMID_SELF || self.domains.get(&d).is_some_and(|d| d.introduced);
                Ok(Outcome::reply(if yes { b"T\0".to_vec() } else { b"F\0".to_vec() }))
            }
            MsgType::RESET_WATCHES => {
                let c = self.conns.get_mut(&id).expect("connection exists");
                c.watches.clear();
                c.transactions.clear();
                Ok(Outcome::reply(ACK.to_vec()))
            }
            MsgType::CONTROL => self.control(p),
            _ => Err(XsErrno::ENOSYS),
        }
    }

    fn tree_op(
        &mut self,
        id: ConnId,
        caller: Caller,
        tx: Option<u32>,
        f: impl FnOnce(&mut Op) -> Result<Vec<u8>, XsErrno>,
    ) -> Result<Outcome, XsErrno> {
        let State { tree, conns, config, .. } = self;
        match tx {
            None => {
                let mut op = Op { store: tree, caller, quotas: &config.quotas, fires: Vec::new() };
                let reply = f(&mut op)?;
                Ok(Outcome { reply, fires: op.fires, after: None })
            }
            Some(txid) => {
                let t = conns.get_mut(&id).and_then(|c| c.transactions.get_mut(&txid)).ok_or(XsErrno::ENOENT)?;
                let mut store = t.store(tree);
                let mut op = Op { store: &mut store, caller, quotas: &config.quotas, fires: Vec::new() };
                let reply = f(&mut op)?;
                for fire in std::mem::take(&mut op.fires) {
                    t.queue_fire(fire);
                }
                Ok(Outcome::reply(reply))
            }
        }
    }

    /// `do_watch()`.
    fn watch(&mut self, id: ConnId, caller: Caller, p: &[u8]) -> Result<Outcome, XsErrno> {
        let args = strings(p);
        if args.len() != 2 {
            return Err(XsErrno::EINVAL);
        }
        let (node, relative_to) = if args[0].first() == Some(&b'@') {
            if args[0].len() > REL_PATH_MAX {
                return Err(XsErrno::EINVAL);
            }
            (String::from_utf8(args[0].to_vec()).map_err(|_| XsErrno::EINVAL)?, None)
        } else {
            let relative = args[0].first() != Some(&b'/');
            let node = canonicalize(&caller, &self.config.quotas, Some(args[0]), false)?;
            (node, relative.then(|| home_path(caller.domid)))
        };
        let token = args[1].to_vec();
        let c = &self.conns[&id];
        if c.watches.iter().any(|w| w.node == node && w.token == token) {
            return Err(XsErrno::EEXIST);
        }
        if !caller.privileged {
            let count: usize = self.conns.values().filter(|c| c.domid == caller.domid).map(|c| c.watches.len()).sum();
            if count > self.config.quotas.watches {
                return Err(XsErrno::E2BIG);
            }
        }
        let w = Watch { node, token, relative_to };
        let first = w.event_payload(&w.node);
        self.conns.get_mut(&id).expect("connection exists").watches.push(w);
        Ok(Outcome { reply: ACK.to_vec(), fires: Vec::new(), after: first })
    }

    /// `do_unwatch()`: the path is only made absolute, not checked.
    fn unwatch(&mut self, id: ConnId, caller: Caller, p: &[u8]) -> Result<Outcome, XsErrno> {
        let args = strings(p);
        if args.len() != 2 {
            return Err(XsErrno::EINVAL);
        }
        let path = String::from_utf8_lossy(args[0]);
        let node = if path.starts_with('/') || path.starts_with('@') {
            path.into_owned()
        } else {
            format!("{}/{path}", home_path(caller.domid))
        };
        let c = self.conns.get_mut(&id).expect("connection exists");
        let pos = c.watches.iter().position(|w| w.node == node && w.token == args[1]).ok_or(XsErrno::ENOENT)?;
        c.watches.remove(pos);
        Ok(Outcome::reply(ACK.to_vec()))
    }

    /// `do_transaction_start()`.
    fn transaction_start(&mut self, id: ConnId, caller: Caller, tx: Option<u32>) -> Result<Outcome, XsErrno> {
        if tx.is_some() {
            return Err(XsErrno::EBUSY);
        }
        let quotas = &self.config.quotas;
        let c = self.conns.get_mut(&id).expect("connection exists");
        if !caller.privileged && c.transactions.len() > quotas.transactions {
            return Err(XsErrno::ENOSPC);
        }
        let mut txid = c.next_tx;
        while txid == 0 || c.transactions.contains_key(&txid) {
            txid = txid.wrapping_add(1);
        }
        c.next_tx = txid.wrapping_add(1);
        let limit = (!caller.privileged).then_some(quotas.transaction_nodes);
        c.transactions.insert(txid, Transaction::new(limit));
        Ok(Outcome::reply(with_nul(&txid.to_string())))
    }

    /// `do_transaction_end()`: `T` commits, `F` aborts; the transaction is
    /// gone either way.
    fn transaction_end(&mut self, id: ConnId, tx: Option<u32>, p: &[u8]) -> Result<Outcome, XsErrno> {
        let commit = match onearg(p) {
            Some(b"T") => true,
            Some(b"F") => false,
            _ => return Err(XsErrno::EINVAL),
        };
        let txid = tx.ok_or(XsErrno::ENOENT)?;
        let t = self.conns.get_mut(&id).and_then(|c| c.transactions.remove(&txid)).ok_or(XsErrno::ENOENT)?;
        let fires = if commit { t.commit(&mut self.tree)? } else { Vec::new() };
        Ok(Outcome { reply: ACK.to_vec(), fires, after: None })
    }

    /// `do_introduce()`: `domid\0mfn\0port\0`.
    fn introduce(&mut self, p: &[u8]) -> Result<Outcome, XsErrno> {
        let args = strings(p);
        if args.len() < 3 {
            return Err(XsErrno::EINVAL);
        }
        if atoi(args[2]) <= 0 {
            return Err(XsErrno::EINVAL);
        }
        let fires = self.introduce_domain(atoi(args[0]) as u32);
        Ok(Outcome { reply: ACK.to_vec(), fires, after: None })
    }

    /// Marks `domid` introduced; the `@introduceDomain` fire if it was not.
    pub fn introduce_domain(&mut self, domid: u32) -> Vec<Fire> {
        let d = self.domains.entry(domid).or_default();
        if d.introduced {
            return Vec::new();
        }
        d.introduced = true;
        vec![Fire { path: "@introduceDomain".into(), exact: false, perm_sets: Vec::new() }]
    }

    /// Forgets `domid`, closes the connections acting as it (its ring, in
    /// xenstored) and removes the nodes it owns (`domain_tree_remove()`,
    /// xenstored without `--keep-orphans`); returns the fires: the removed
    /// nodes', then `@releaseDomain`.
    pub fn release(&mut self, domid: u32) -> Vec<Fire> {
        let Some(d) = self.domains.get_mut(&domid) else { return Vec::new() };
        if !d.introduced || domid == 0 {
            return Vec::new();
        }
        *d = DomainInfo::default();
        for d in self.domains.values_mut().filter(|d| d.target == Some(domid)) {
            d.target = None;
        }
        let gone: Vec<ConnId> =
            self.conns.iter().filter(|(_, c)| c.domid == domid && c.server.is_none()).map(|(&i, _)| i).collect();
        for id in gone {
            if let Some(c) = self.conns.remove(&id) {
                c.out.close();
                let _ = c.stream.shutdown(std::net::Shutdown::Both);
            }
        }
        let mut fires = Vec::new();
        for path in self.owned_subtrees(domid) {
            let mut op =
                Op { store: &mut self.tree, caller: Caller::dom0(), quotas: &self.config.quotas, fires: Vec::new() };
            if op.rm(&with_nul(&path)).is_ok() {
                fires.append(&mut op.fires);
            }
        }
        fires.push(Fire { path: "@releaseDomain".into(), exact: false, perm_sets: Vec::new() });
        fires
    }

    /// The topmost nodes owned by `domid`, in tree order.
    fn owned_subtrees(&self, domid: u32) -> Vec<String> {
        let mut found = Vec::new();
        let mut stack = vec!["/".to_string()];
        while let Some(path) = stack.pop() {
            let Some(node) = self.tree.get(&path) else { continue };
            if path != "/" && node.owner() == domid {
                found.push(path);
                continue;
            }
            stack.extend(node.children.iter().rev().map(|c| super::node::child_path(&path, c)));
        }
        found
    }

    /// `onearg_domain()`: an introduced domain other than 0.
    fn onearg_domain(&self, p: &[u8]) -> Result<u32, XsErrno> {
        let domid = atoi(onearg(p).ok_or(XsErrno::EINVAL)?) as u32;
        if domid == 0 {
            return Err(XsErrno::EINVAL);
        }
        self.connected_domain(domid)
    }

    fn connected_domain(&self, domid: u32) -> Result<u32, XsErrno> {
        match self.domains.get(&domid) {
            Some(d) if d.introduced => Ok(domid),
            _ => Err(XsErrno::ENOENT),
        }
    }

    /// `do_set_target()`: `domid\0target\0`.
    fn set_target(&mut self, p: &[u8]) -> Result<Outcome, XsErrno> {
        let args = strings(p);
        if args.len() < 2 {
            return Err(XsErrno::EINVAL);
        }
        let domid = self.connected_domain(atoi(args[0]) as u32)?;
        let target = self.connected_domain(atoi(args[1]) as u32)?;
        self.domains.get_mut(&domid).expect("domain exists").target = Some(target);
        Ok(Outcome::reply(ACK.to_vec()))
    }

    /// `do_control()`: the commands that make sense here; others are `EINVAL`.
    fn control(&mut self, p: &[u8]) -> Result<Outcome, XsErrno> {
        let args = strings(p);
        let (cmd, rest) = args.split_first().ok_or(XsErrno::EINVAL)?;
        let text = |s: String| Ok(Outcome::reply(with_nul(&s)));
        match (*cmd, rest.len()) {
            (b"check", 0) | (b"memreport", _) => Ok(Outcome::reply(ACK.to_vec())),
            (b"print", 1) => {
                log::info!("control: {}", String::from_utf8_lossy(rest[0]));
                Ok(Outcome::reply(ACK.to_vec()))
            }
            (b"log", 0) => text("Log switch settings:\n".to_string()),
            (b"log", 1) if matches!(rest[0], b"on" | b"off") => Ok(Outcome::reply(ACK.to_vec())),
            (b"help", 0) => {
                text("Valid commands:\ncheck\nlog [on|off]\nmemreport\nprint <string>\nquota\nhelp\n".into())
            }
            (b"quota", 0) => {
                let q = &self.config.quotas;
                text(format!(
                    "Transaction nodes per transaction:    {}\nNodes per domain:                     {}\n\
                     Node permissions:                     {}\nNode size:                            {}\n\
                     Path length:                          {}\nTransactions per domain:              {}\n\
                     Watches per domain:                   {}\n",
                    q.transaction_nodes, q.nodes, q.perms, q.node_size, q.path_length, q.transactions, q.watches
                ))
            }
            _ => Err(XsErrno::EINVAL),
        }
    }

    /// The committed node's value at an absolute path.
    pub fn read_value(&self, path: &str) -> Option<Vec<u8>> {
        self.tree.get(path).map(|n| n.value.clone())
    }

    /// A direct tree operation as dom0, outside any connection (for tests
    /// and tools embedding the server); watches fire.
    pub fn dom0_op(&mut self, f: impl FnOnce(&mut Op) -> Result<Vec<u8>, XsErrno>) -> Result<Vec<u8>, XsErrno> {
        let mut op = Op {
            store: &mut self.tree as &mut dyn Store,
            caller: Caller::dom0(),
            quotas: &self.config.quotas,
            fires: Vec::new(),
        };
        let r = f(&mut op)?;
        let fires = op.fires;
        self.fire(&fires);
        Ok(r)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use xs_wire::Decoder;

    struct Harness {
        state: State,
        _peers: Vec<UnixStream>,
    }

    impl Harness {
        fn new() -> Self {
            Harness { state: State::new(XenstoredConfig::default()), _peers: Vec::new() }
        }

        fn conn(&mut self, domid: u32) -> ConnId {
            let (a, b) = UnixStream::pair().unwrap();
            let id = self.state.conns.len() as ConnId + 1;
            let out = Arc::new(OutQueue::new(1 << 20));
            self.state.conns.insert(id, ConnState::new(domid, domid == 0, out, a, None));
            self._peers.push(b);
            id
        }

        /// Runs one request and returns everything queued for `id`, in order.
        fn run(&mut self, id: ConnId, t: MsgType, tx: u32, payload: &[u8]) -> Vec<Message> {
            self.state.process(id, &Message { msg_type: t, req_id: 7, tx_id: tx, payload: payload.to_vec() });
            self.drain(id)
        }

        fn drain(&mut self, id: ConnId) -> Vec<Message> {
            let out = self.state.conns[&id].out.clone();
            let mut msgs = Vec::new();
            out.take_all(|bytes| {
                let mut dec = Decoder::new();
                dec.decode_all(&bytes, &mut msgs).unwrap();
            });
            msgs
        }

        fn err(&mut self, id: ConnId, t: MsgType, tx: u32, payload: &[u8]) -> Option<XsErrno> {
            let msgs = self.run(id, t, tx, payload);
            assert_eq!(msgs.len(), 1, "{msgs:?}");
            assert_eq!((msgs[0].req_id, msgs[0].tx_id), (7, tx));
            msgs[0].as_error()
        }
    }

    #[test]
    fn unknown_and_client_only_types_are_enosys() {
        let mut h = Harness::new();
        let c = h.conn(0);
        for t in [20, 15, 16, 23, 26, 27, 0xffff] {
            assert_eq!(h.err(c, MsgType(t), 0, b""), Some(XsErrno::ENOSYS), "type {t}");
        }
    }

    #[test]
    fn privileged_requests_from_domains_are_eacces() {
        let mut h = Harness::new();
        let c = h.conn(3);
        for t in [
            MsgType::CONTROL,
            MsgType::INTRODUCE,
            MsgType::RELEASE,
            MsgType::IS_DOMAIN_INTRODUCED,
            MsgType::RESUME,
            MsgType::SET_TARGET,
        ] {
            assert_eq!(h.err(c, t, 0, b"1\0"), Some(XsErrno::EACCES), "{t:?}");
        }
        assert_eq!(h.err(c, MsgType::GET_DOMAIN_PATH, 0, b"3\0"), None);
        assert_eq!(h.err(c, MsgType::RESET_WATCHES, 0, b""), None);
    }

    #[test]
    fn unknown_transaction_id_is_enoent_except_for_watches() {
        let mut h = Harness::new();
        let c = h.conn(0);
        assert_eq!(h.err(c, MsgType::READ, 42, b"/tool\0"), Some(XsErrno::ENOENT));
        assert_eq!(h.err(c, MsgType::GET_DOMAIN_PATH, 42, b"1\0"), Some(XsErrno::ENOENT));
        let msgs = h.run(c, MsgType::WATCH, 42, b"/tool\0t\0");
        assert_eq!(msgs[0].payload, ACK, "XS_FLAG_NOTID");
    }

    #[test]
    fn own_watch_event_precedes_write_reply_and_follows_watch_reply() {
        let mut h = Harness::new();
        let c = h.conn(0);
        let msgs = h.run(c, MsgType::WATCH, 0, b"/a\0t\0");
        assert_eq!(msgs.iter().map(|m| m.msg_type).collect::<Vec<_>>(), [MsgType::WATCH, MsgType::WATCH_EVENT]);
        let msgs = h.run(c, MsgType::WRITE, 0, b"/a\0v");
        assert_eq!(msgs.iter().map(|m| m.msg_type).collect::<Vec<_>>(), [MsgType::WATCH_EVENT, MsgType::WRITE]);
        assert_eq!(msgs[0].payload, b"/a\0t\0");
    }

    #[test]
    fn nested_transaction_start_is_ebusy_and_ids_are_decimal() {
        let mut h = Harness::new();
        let c = h.conn(0);
        let msgs = h.run(c, MsgType::TRANSACTION_START, 0, b"\0");
        assert_eq!(msgs[0].payload, b"1\0");
        assert_eq!(h.err(c, MsgType::TRANSACTION_START, 1, b"\0"), Some(XsErrno::EBUSY));
        assert_eq!(h.run(c, MsgType::TRANSACTION_START, 0, b"\0")[0].payload, b"2\0");
    }

    #[test]
    fn read_in_tx_does_not_see_a_later_outside_write_and_commit_is_eagain() {
        let mut h = Harness::new();
        let (c, other) = (h.conn(0), h.conn(0));
        h.run(c, MsgType::WRITE, 0, b"/a\0a");
        assert_eq!(h.run(c, MsgType::TRANSACTION_START, 0, b"\0")[0].payload, b"1\0");
        assert_eq!(h.run(c, MsgType::READ, 1, b"/a\0")[0].payload, b"a");
        assert_eq!(h.err(other, MsgType::WRITE, 0, b"/a\0b"), None);
        assert_eq!(h.run(c, MsgType::READ, 1, b"/a\0")[0].payload, b"a");
        assert_eq!(h.err(c, MsgType::TRANSACTION_END, 1, b"T\0"), Some(XsErrno::EAGAIN));
        assert_eq!(h.run(c, MsgType::READ, 0, b"/a\0")[0].payload, b"b");
    }

    #[test]
    fn ending_a_transaction_twice_is_enoent_and_f_discards_it() {
        let mut h = Harness::new();
        let c = h.conn(0);
        h.run(c, MsgType::TRANSACTION_START, 0, b"\0");
        h.run(c, MsgType::WRITE, 1, b"/x\0v");
        assert_eq!(h.err(c, MsgType::TRANSACTION_END, 1, b"F\0"), None);
        assert_eq!(h.err(c, MsgType::TRANSACTION_END, 1, b"F\0"), Some(XsErrno::ENOENT));
        assert_eq!(h.err(c, MsgType::TRANSACTION_END, 1, b"T\0"), Some(XsErrno::ENOENT));
        assert_eq!(h.err(c, MsgType::WRITE, 1, b"/x\0v"), Some(XsErrno::ENOENT));
        assert_eq!(h.err(c, MsgType::READ, 0, b"/x\0"), Some(XsErrno::ENOENT), "aborted write gone");
    }

    #[test]
    fn transaction_ids_belong_to_their_connection() {
        let mut h = Harness::new();
        let (c, other) = (h.conn(0), h.conn(0));
        h.run(c, MsgType::TRANSACTION_START, 0, b"\0");
        assert_eq!(h.err(other, MsgType::READ, 1, b"/tool\0"), Some(XsErrno::ENOENT));
        assert_eq!(h.err(other, MsgType::TRANSACTION_END, 1, b"T\0"), Some(XsErrno::ENOENT));
        assert_eq!(h.err(c, MsgType::TRANSACTION_END, 1, b"T\0"), None);
    }

    #[test]
    fn domain_gets_enospc_past_quota_plus_one_open_transactions_dom0_never() {
        // xenstored 4.17: `transaction_started > quota_max_transaction`,
        // counted per connection, for unprivileged connections only.
        let mut h = Harness::new();
        let (d5, dom0) = (h.conn(5), h.conn(0));
        let quota = h.state.config.quotas.transactions;
        for _ in 0..=quota {
            assert_eq!(h.err(d5, MsgType::TRANSACTION_START, 0, b"\0"), None);
        }
        assert_eq!(h.err(d5, MsgType::TRANSACTION_START, 0, b"\0"), Some(XsErrno::ENOSPC));
        let second = h.conn(5);
        assert_eq!(h.err(second, MsgType::TRANSACTION_START, 0, b"\0"), None, "per connection");
        assert_eq!(h.err(d5, MsgType::TRANSACTION_END, 3, b"F\0"), None);
        assert_eq!(h.err(d5, MsgType::TRANSACTION_START, 0, b"\0"), None, "an ended one frees a slot");
        for _ in 0..3 * quota {
            assert_eq!(h.err(dom0, MsgType::TRANSACTION_START, 0, b"\0"), None);
        }
    }

    #[test]
    fn directory_reply_over_payload_max_is_e2big() {
        let mut h = Harness::new();
        let c = h.conn(0);
        for i in 0..300 {
            h.run(c, MsgType::WRITE, 0, format!("/big/child-number-{i}\0").as_bytes());
        }
        assert_eq!(h.err(c, MsgType::DIRECTORY, 0, b"/big\0"), Some(XsErrno::E2BIG));
        assert_eq!(h.err(c, MsgType::DIRECTORY_PART, 0, b"/big\x000\0"), None);
    }

    #[test]
    fn control_accepts_harmless_commands_only() {
        let mut h = Harness::new();
        let c = h.conn(0);
        assert_eq!(h.err(c, MsgType::CONTROL, 0, b"print\0hello\0"), None);
        assert_eq!(h.err(c, MsgType::CONTROL, 0, b"log\0on\0"), None);
        assert_eq!(h.err(c, MsgType::CONTROL, 0, b"live-update\0-s\0"), Some(XsErrno::EINVAL));
        assert_eq!(h.err(c, MsgType::CONTROL, 0, b""), Some(XsErrno::EINVAL));
    }

    #[test]
    fn release_removes_the_domains_nodes_and_fires_release() {
        let mut h = Harness::new();
        let c = h.conn(0);
        h.run(c, MsgType::WRITE, 0, b"/local/domain/5/x\0");
        h.run(c, MsgType::SET_PERMS, 0, b"/local/domain/5\0n5\0");
        h.run(c, MsgType::WRITE, 0, b"/backend/vbd/5/0\0");
        h.run(c, MsgType::SET_PERMS, 0, b"/backend/vbd/5/0\0n0\0r5\0");
        h.run(c, MsgType::WATCH, 0, b"@releaseDomain\0r\0");
        h.run(c, MsgType::WATCH, 0, b"/local/domain/5/x\0x\0");
        h.state.introduce_domain(5);
        let fires = h.state.release(5);
        h.state.fire(&fires);
        assert!(h.state.tree.get("/local/domain/5").is_none());
        assert!(h.state.tree.get("/backend/vbd/5/0").is_some(), "owned by dom0");
        let events: Vec<Vec<u8>> = h.drain(c).into_iter().map(|m| m.payload).collect();
        assert_eq!(events, [&b"/local/domain/5/x\0x\0"[..], b"@releaseDomain\0r\0"]);
        assert!(h.state.release(5).is_empty(), "released once");
    }

    /// A fixed-seed generator, so that a failure reproduces.
    struct Rng(crate::rng::Rng);

    impl Rng {
        fn next(&mut self) -> u64 {
            self.0.next_u64()
        }

        fn pick<'a>(&mut self, items: &[&'a [u8]]) -> &'a [u8] {
            items[self.0.below(items.len() as u64) as usize]
        }
    }

    #[test]
    fn random_requests_never_break_the_tree_or_the_server() {
        let mut h = Harness::new();
        let conns = [h.conn(0), h.conn(0), h.conn(5), h.conn(6)];
        h.state.introduce_domain(5);
        h.run(conns[0], MsgType::WRITE, 0, b"/local/domain/5\0");
        h.run(conns[0], MsgType::SET_PERMS, 0, b"/local/domain/5\0n5\0r6\0");
        let paths: &[&[u8]] = &[
            b"/a",
            b"/a/b",
            b"/a/b/c",
            b"/local/domain/5/x",
            b"x/y",
            b"/",
            b"",
            b"@releaseDomain",
            b"/a//b",
            b"/a/",
            b"\xff",
            b"/local/domain/6/z",
        ];
        let tails: &[&[u8]] = &[b"", b"\0", b"\0v", b"\0t\0", b"\0n5\0r6\0", b"\0b0\0", b"\0T\0", b"\x001\x002\0"];
        let mut rng = Rng(crate::rng::Rng::new(0x9e37_79b9_7f4a_7c15));
        for _ in 0..20_000 {
            let c = conns[(rng.next() % conns.len() as u64) as usize];
            let t = MsgType((rng.next() % 28) as u32);
            let tx = (rng.next() % 4) as u32;
            let mut payload = rng.pick(paths).to_vec();
            payload.extend_from_slice(rng.pick(tails));
            if t == MsgType::TRANSACTION_END {
                payload = rng.pick(&[b"T\0", b"F\0", b"X\0"]).to_vec();
            }
            let msgs = h.run(c, t, tx, &payload);
            let replies = msgs.iter().filter(|m| m.msg_type != MsgType::WATCH_EVENT).count();
            assert_eq!(replies, 1, "one reply per request: {t:?} {payload:?}");
        }
        h.state.tree.check().unwrap();
        let fires = h.state.release(5);
        h.state.fire(&fires);
        h.state.tree.check().unwrap();
    }

    #[test]
    fn reset_watches_drops_watches_and_transactions() {
        let mut h = Harness::new();
        let c = h.conn(0);
        h.run(c, MsgType::WATCH, 0, b"/a\0t\0");
        h.run(c, MsgType::TRANSACTION_START, 0, b"\0");
        h.run(c, MsgType::RESET_WATCHES, 0, b"");
        assert_eq!(h.err(c, MsgType::READ, 1, b"/tool\0"), Some(XsErrno::ENOENT));
        assert!(h.run(c, MsgType::WRITE, 0, b"/a\0").iter().all(|m| m.msg_type == MsgType::WRITE));
    }
}
