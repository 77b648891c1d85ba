//! Fakes of the seam (`host_api`) for native tests: a [`World`] is one Envoy
//! process (a clock, its shared data, its stats), and each [`FakeHost`] one
//! VM in it, so that several VMs can race for the same shared data the way
//! Envoy's workers do. A [`FakeStream`] is one request.

use std::cell::{Cell, RefCell};
use std::collections::BTreeMap;
use std::rc::Rc;

use crate::headers::{self, Header};
use crate::host_api::{
    Callout, CalloutError, Host, HostError, Level, MetricKind, Stream, TokenFetch, Write,
};

/// One Envoy process.
#[derive(Default)]
pub struct World {
    pub clock_ms: Cell<u64>,
    /// Shared data: value and version; every write bumps the version.
    shared: RefCell<BTreeMap<String, (Vec<u8>, u32)>>,
    next_version: Cell<u32>,
    /// Stats by name (all VMs add to the same one, as in Envoy).
    stats: RefCell<BTreeMap<String, i64>>,
    /// Compare-and-swap writes to fail as if another VM had written first.
    pub conflicts_to_inject: Cell<usize>,
}

impl World {
    pub fn new(start_ms: u64) -> Rc<World> {
        let world = World::default();
        world.clock_ms.set(start_ms);
        world.next_version.set(1);
        Rc::new(world)
    }

    pub fn advance(&self, ms: u64) {
        self.clock_ms.set(self.clock_ms.get() + ms);
    }

    pub fn shared(&self, key: &str) -> Option<Vec<u8>> {
        self.shared.borrow().get(key).map(|(v, _)| v.clone())
    }

    pub fn shared_keys(&self) -> Vec<String> {
        self.shared.borrow().keys().cloned().collect()
    }

    pub fn stat(&self, name: &str) -> i64 {
        self.stats.borrow().get(name).copied().unwrap_or(0)
    }

    fn bump(&self) -> u32 {
        let version = self.next_version.get();
        self.next_version.set(version + 1);
        version
    }
}

/// A callout a VM sent.
#[derive(Debug, Clone)]
pub struct SentCallout {
    pub id: u32,
    pub cluster: String,
    pub headers: Vec<(String, String)>,
    pub body: Option<Vec<u8>>,
    pub timeout_ms: u64,
    pub token_for: Option<TokenFetch>,
}

/// One VM of a [`World`].
pub struct FakeHost {
    pub world: Rc<World>,
    pub callouts: Vec<SentCallout>,
    next_callout: u32,
    /// The next callouts fail to go out with this.
    pub refuse_callouts: Option<CalloutError>,
    metric_names: Vec<String>,
    pub logs: RefCell<Vec<(Level, String)>>,
    pub tick_period_ms: u32,
}

impl FakeHost {
    /// A VM; `first_callout` keeps callout ids apart between VMs.
    pub fn new(world: &Rc<World>, first_callout: u32) -> Self {
        FakeHost {
            world: Rc::clone(world),
            callouts: Vec::new(),
            next_callout: first_callout,
            refuse_callouts: None,
            metric_names: Vec::new(),
            logs: RefCell::new(Vec::new()),
            tick_period_ms: 0,
        }
    }

    pub fn logged(&self, needle: &str) -> bool {
        self.logs
            .borrow()
            .iter()
            .any(|(_, line)| line.contains(needle))
    }
}

impl Host for FakeHost {
    fn now_ms(&self) -> u64 {
        self.world.clock_ms.get()
    }

    fn shared_get(&self, key: &str) -> Result<Option<(Vec<u8>, u32)>, HostError> {
        Ok(self.world.shared.borrow().get(key).cloned())
    }

    fn shared_set(&self, key: &str, value: &[u8], cas: u32) -> Write {
        let mut shared = self.world.shared.borrow_mut();
        if cas != 0 {
            let injected = self.world.conflicts_to_inject.get();
            if injected > 0 {
                self.world.conflicts_to_inject.set(injected - 1);
                // Another VM wrote in between: the version moves on.
                if let Some(entry) = shared.get_mut(key) {
                    entry.1 = self.world.bump();
                }
                return Write::Conflict;
            }
            match shared.get(key) {
                Some((_, version)) if *version == cas => {}
                _ => return Write::Conflict,
            }
        }
        let version = self.world.bump();
        shared.insert(key.to_string(), (value.to_vec(), version));
        Write::Done
    }

    fn http_call(&mut self, callout: &Callout<'_>) -> Result<u32, CalloutError> {
        if let Some(error) = self.refuse_callouts {
            return Err(error);
        }
        let id = self.next_callout;
        self.next_callout += 1;
        self.callouts.push(SentCallout {
            id,
            cluster: callout.cluster.to_string(),
            headers: callout
                .headers
                .iter()
                .map(|(n, v)| (n.to_string(), v.to_string()))
                .collect(),
            body: callout.body.map(<[u8]>::to_vec),
            timeout_ms: callout.timeout_ms,
            token_for: callout.token_for,
        });
        Ok(id)
    }

    fn define_metric(&mut self, _kind: MetricKind, name: &str) -> Result<u32, HostError> {
        self.metric_names.push(name.to_string());
        Ok(self.metric_names.len() as u32 - 1)
    }

    fn add_to_metric(&mut self, id: u32, delta: i64) {
        if let Some(name) = self.metric_names.get(id as usize) {
            *self
                .world
                .stats
                .borrow_mut()
                .entry(name.clone())
                .or_default() += delta;
        }
    }

    fn set_metric(&mut self, id: u32, value: u64) {
        if let Some(name) = self.metric_names.get(id as usize) {
            let value = i64::try_from(value).unwrap_or(i64::MAX);
            self.world.stats.borrow_mut().insert(name.clone(), value);
        }
    }

    fn log_enabled(&self, _level: Level) -> bool {
        true
    }

    fn log(&self, level: Level, message: &str) {
        self.logs.borrow_mut().push((level, message.to_string()));
    }

    fn set_tick_period_ms(&mut self, period: u32) {
        self.tick_period_ms = period;
    }
}

/// A local reply the filter sent.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reply {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
}

impl Reply {
    pub fn json(&self) -> serde_json::Value {
        serde_json::from_slice(&self.body).unwrap_or_default()
    }
}

/// One request: what the caller sent, and what the filter did to it.
#[derive(Debug, Default)]
pub struct FakeStream {
    pub request_headers: Vec<(String, Vec<u8>)>,
    pub request_body: Vec<u8>,
    pub response_headers: Vec<(String, Vec<u8>)>,
    pub response_body: Vec<u8>,
    pub reply: Option<Reply>,
    pub resumed: bool,
    /// What the filter published (`set_property`), last value per name.
    pub properties: std::collections::BTreeMap<String, Vec<u8>>,
}

impl FakeStream {
    pub fn request(method: &str, path: &str, headers: &[(&str, &str)], body: &[u8]) -> Self {
        let mut all = vec![
            (":method".to_string(), method.as_bytes().to_vec()),
            (":path".to_string(), path.as_bytes().to_vec()),
        ];
        all.extend(
            headers
                .iter()
                .map(|(n, v)| (n.to_string(), v.as_bytes().to_vec())),
        );
        FakeStream {
            request_headers: all,
            request_body: body.to_vec(),
            ..FakeStream::default()
        }
    }

    /// Every value of a request header, as the upstream would get them.
    pub fn header(&self, name: &str) -> Vec<String> {
        self.request_headers
            .iter()
            .filter(|(n, _)| n == name)
            .map(|(_, v)| String::from_utf8_lossy(v).into_owned())
            .collect()
    }

    /// Every value of a response header, as the caller would get them.
    pub fn response_header(&self, name: &str) -> Vec<String> {
        self.response_headers
            .iter()
            .filter(|(n, _)| n == name)
            .map(|(_, v)| String::from_utf8_lossy(v).into_owned())
            .collect()
    }
}

fn encode(map: &[(String, Vec<u8>)]) -> Vec<u8> {
    let pairs: Vec<Header> = map
        .iter()
        .map(|(n, v)| (n.as_bytes(), v.as_slice()))
        .collect();
    headers::encode(&pairs)
}

impl Stream for FakeStream {
    fn request_headers(&mut self) -> Result<Vec<u8>, HostError> {
        Ok(encode(&self.request_headers))
    }

    fn set_request_header(&mut self, name: &str, value: &[u8]) -> Result<(), HostError> {
        self.request_headers.retain(|(n, _)| n != name);
        self.request_headers
            .push((name.to_string(), value.to_vec()));
        Ok(())
    }

    fn remove_request_header(&mut self, name: &str) -> Result<(), HostError> {
        self.request_headers.retain(|(n, _)| n != name);
        Ok(())
    }

    fn request_body(&mut self, start: usize, len: usize) -> Result<Vec<u8>, HostError> {
        let end = (start + len).min(self.request_body.len());
        Ok(self
            .request_body
            .get(start.min(end)..end)
            .unwrap_or_default()
            .to_vec())
    }

    fn request_body_len(&mut self) -> Result<usize, HostError> {
        Ok(self.request_body.len())
    }

    fn replace_request_body_prefix(&mut self, len: usize, with: &[u8]) -> Result<(), HostError> {
        let len = len.min(self.request_body.len());
        self.request_body.splice(..len, with.iter().copied());
        Ok(())
    }

    fn response_headers(&mut self) -> Result<Vec<u8>, HostError> {
        Ok(encode(&self.response_headers))
    }

    fn set_response_header(&mut self, name: &str, value: &[u8]) -> Result<(), HostError> {
        self.response_headers.retain(|(n, _)| n != name);
        self.response_headers
            .push((name.to_string(), value.to_vec()));
        Ok(())
    }

    fn remove_response_header(&mut self, name: &str) -> Result<(), HostError> {
        self.response_headers.retain(|(n, _)| n != name);
        Ok(())
    }

    fn response_body(&mut self, start: usize, len: usize) -> Result<Vec<u8>, HostError> {
        let end = (start + len).min(self.response_body.len());
        Ok(self
            .response_body
            .get(start.min(end)..end)
            .unwrap_or_default()
            .to_vec())
    }

    fn replace_response_body(
        &mut self,
        start: usize,
        len: usize,
        with: &[u8],
    ) -> Result<(), HostError> {
        let start = start.min(self.response_body.len());
        let end = (start + len).min(self.response_body.len());
        self.response_body.splice(start..end, with.iter().copied());
        Ok(())
    }

    fn send_reply(
        &mut self,
        status: u16,
        headers: &[(&[u8], &[u8])],
        body: &[u8],
    ) -> Result<(), HostError> {
        self.reply = Some(Reply {
            status,
            headers: headers
                .iter()
                .map(|(n, v)| {
                    (
                        String::from_utf8_lossy(n).into_owned(),
                        String::from_utf8_lossy(v).into_owned(),
                    )
                })
                .collect(),
            body: body.to_vec(),
        });
        Ok(())
    }

    fn resume_request(&mut self) -> Result<(), HostError> {
        self.resumed = true;
        Ok(())
    }

    fn set_property(&mut self, name: &str, value: &[u8]) -> Result<(), HostError> {
        self.properties.insert(name.to_string(), value.to_vec());
        Ok(())
    }
}
