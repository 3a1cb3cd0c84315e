//! GitHub's webhook deliveries, as GitHub sends them: its own example
//! payloads (from `@octokit/webhooks-examples`, installed into
//! `tests/node` by `make deps`), editable, serialized byte for byte the way
//! GitHub does and signed with the webhook secret.
//!
//! ```ignore
//! let delivery = Delivery::example("issues", Some("labeled"))
//!     .repository("acme/widgets")
//!     .issue_number(7)
//!     .labels(&["ccc"])
//!     .issue_author("alice", UserKind::User, "OWNER");
//! let signed = delivery.sign(b"secret", Encoding::Json);
//! let answer = webhooks::post(&format!("{coordinator}/webhook"), &signed)?;
//! ```
//!
//! The body is compact JSON with the example's own key order (new keys come
//! after the example's), strings escaped and numbers written as JavaScript's
//! `JSON.stringify` writes them, which is what GitHub sends. That matters
//! beyond looks: smee-client re-serializes the payload with
//! `JSON.stringify`, so the signature over the original bytes still verifies
//! after the relay only if the original was written that way. The key order
//! is kept without serde_json's `preserve_order` feature (which would change
//! the coordinator's own `Value`s when built together): the order is read
//! from the example's text once, as a `Shape`, and the editable payload is a
//! plain `serde_json::Value` written in that order.
//!
//! Headers are those GitHub sends: `X-GitHub-Event`, `X-GitHub-Delivery` (a
//! UUID), `X-GitHub-Hook-ID`, `X-GitHub-Hook-Installation-Target-ID` and
//! `-Type`, `X-Hub-Signature-256: sha256=<hex HMAC-SHA256 of the exact body>`,
//! `User-Agent: GitHub-Hookshot/<hex>`, `Accept: */*` and `Content-Type`
//! (`application/json`, or `application/x-www-form-urlencoded` with the body
//! `payload=<url-encoded JSON>`, signed as sent). The legacy SHA-1
//! `X-Hub-Signature` is not sent.

use std::collections::BTreeMap;
use std::fmt;
use std::path::PathBuf;
use std::sync::OnceLock;
use std::time::Duration;

use axum::http::Method;
use hmac::{Hmac, KeyInit, Mac};
use serde::de::{self, Deserialize, Deserializer, MapAccess, SeqAccess, Visitor};
use serde_json::{Value, json};
use sha2::Sha256;

use crate::http::{self, Answer};

/// Where GitHub's example payloads are installed.
pub fn examples_path() -> PathBuf {
    crate::npm::node_modules().join("@octokit/webhooks-examples/api.github.com/index.json")
}

/// Who performed something: GitHub's `user.type`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum UserKind {
    User,
    Bot,
}

impl UserKind {
    pub fn as_str(self) -> &'static str {
        match self {
            UserKind::User => "User",
            UserKind::Bot => "Bot",
        }
    }
}

/// How a delivery's body is encoded (the webhook's "content type" setting).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Encoding {
    /// `application/json`: the body is the JSON payload.
    Json,
    /// `application/x-www-form-urlencoded`: the body is `payload=<JSON>`.
    Form,
}

/// One webhook delivery, before it is signed: the event name and its
/// payload, editable directly (`payload` is public) or with the helpers.
#[derive(Clone, Debug)]
pub struct Delivery {
    pub event: String,
    pub id: String,
    pub payload: Value,
    /// The key order of the example the payload came from.
    shape: Shape,
}

/// A delivery ready to send: the exact headers and bytes GitHub would send.
#[derive(Clone, Debug)]
pub struct Signed {
    pub event: String,
    pub id: String,
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
    pub encoding: Encoding,
}

impl Signed {
    /// A header's value (names compare case-insensitively).
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }
}

/// Every example GitHub publishes for `event` with `action` (`None`: any
/// action, e.g. for `ping` which has none).
pub fn examples(event: &str, action: Option<&str>) -> Vec<Delivery> {
    let all = loaded();
    all.get(event)
        .map(|examples| {
            examples
                .iter()
                .filter(|(payload, _)| {
                    action.is_none_or(|a| payload.get("action").and_then(Value::as_str) == Some(a))
                })
                .map(|(payload, shape)| Delivery {
                    event: event.to_owned(),
                    id: delivery_id(),
                    payload: payload.clone(),
                    shape: shape.clone(),
                })
                .collect()
        })
        .unwrap_or_default()
}

impl Delivery {
    /// GitHub's first example of `event` with `action`; panics naming what
    /// exists when there is none.
    pub fn example(event: &str, action: Option<&str>) -> Self {
        examples(event, action)
            .into_iter()
            .next()
            .unwrap_or_else(|| {
                let actions: Vec<String> = loaded()
                    .get(event)
                    .map(|list| {
                        list.iter()
                            .map(|(p, _)| p.get("action").map(Value::to_string).unwrap_or_default())
                            .collect()
                    })
                    .unwrap_or_default();
                panic!("no example of {event:?} with action {action:?}; actions there: {actions:?}")
            })
    }

    /// A delivery of any payload (keys in `serde_json`'s order).
    pub fn new(event: &str, payload: Value) -> Self {
        Self {
            event: event.to_owned(),
            id: delivery_id(),
            payload,
            shape: Shape::Leaf,
        }
    }

    /// Sets the delivery id (`X-GitHub-Delivery`), e.g. to send a duplicate.
    pub fn id(mut self, id: &str) -> Self {
        id.clone_into(&mut self.id);
        self
    }

    /// Sets the value at a JSON pointer (`/issue/title`), creating objects
    /// on the way.
    pub fn set(mut self, pointer: &str, value: Value) -> Self {
        set_pointer(&mut self.payload, pointer, value);
        self
    }

    /// `repository.full_name`, `name`, `owner.login` and the repository's
    /// `html_url`.
    pub fn repository(self, full_name: &str) -> Self {
        let (owner, name) = full_name
            .split_once('/')
            .unwrap_or_else(|| panic!("{full_name:?} is not owner/name"));
        self.set("/repository/full_name", json!(full_name))
            .set("/repository/name", json!(name))
            .set("/repository/owner/login", json!(owner))
            .set(
                "/repository/html_url",
                json!(format!("https://github.com/{full_name}")),
            )
    }

    /// `issue.number` (or `pull_request.number` for a pull request event).
    pub fn issue_number(self, number: u64) -> Self {
        let key = if self.payload.get("issue").is_some() {
            "issue"
        } else {
            "pull_request"
        };
        self.set(&format!("/{key}/number"), json!(number))
    }

    /// `issue.title` and `issue.body`.
    pub fn issue_text(self, title: &str, body: &str) -> Self {
        self.set("/issue/title", json!(title))
            .set("/issue/body", json!(body))
    }

    /// `issue.labels` (shaped as the example's first label), and for a
    /// `labeled`/`unlabeled` event the `label` that changed (the last one).
    pub fn labels(mut self, names: &[&str]) -> Self {
        let key = if self.payload.get("issue").is_some() {
            "issue"
        } else {
            "pull_request"
        };
        let template = self.payload[key]["labels"]
            .get(0)
            .cloned()
            .or_else(|| self.payload.get("label").cloned())
            .unwrap_or_else(|| json!({"id": 1, "node_id": "LA_fake", "url": "", "name": "", "color": "ededed", "default": false, "description": null}));
        let labels: Vec<Value> = names
            .iter()
            .enumerate()
            .map(|(idx, name)| {
                let mut label = template.clone();
                label["name"] = json!(name);
                label["id"] = json!(9_000_000 + idx as u64);
                label
            })
            .collect();
        if let (Some(last), true) = (labels.last(), self.payload.get("label").is_some()) {
            self.payload["label"] = last.clone();
        }
        self.payload[key]["labels"] = Value::Array(labels);
        self
    }

    /// The issue's author: `issue.user.login`, `.type`, and
    /// `issue.author_association` (OWNER, MEMBER, COLLABORATOR,
    /// CONTRIBUTOR, FIRST_TIME_CONTRIBUTOR, FIRST_TIMER, NONE).
    pub fn issue_author(self, login: &str, kind: UserKind, association: &str) -> Self {
        self.set("/issue/user/login", json!(login))
            .set("/issue/user/type", json!(kind.as_str()))
            .set("/issue/author_association", json!(association))
    }

    /// The comment of an `issue_comment` event: body, author and association.
    pub fn comment(self, body: &str, login: &str, kind: UserKind, association: &str) -> Self {
        self.set("/comment/body", json!(body))
            .set("/comment/user/login", json!(login))
            .set("/comment/user/type", json!(kind.as_str()))
            .set("/comment/author_association", json!(association))
    }

    /// The `sender` (who triggered the event).
    pub fn sender(self, login: &str, kind: UserKind) -> Self {
        self.set("/sender/login", json!(login))
            .set("/sender/type", json!(kind.as_str()))
    }

    /// The payload as GitHub writes it: compact, in the example's key
    /// order, numbers and strings as `JSON.stringify` writes them.
    pub fn body(&self) -> Vec<u8> {
        to_js_json(&self.payload, &self.shape)
    }

    /// The exact request GitHub would send with `secret`.
    pub fn sign(&self, secret: &[u8], encoding: Encoding) -> Signed {
        let json = self.body();
        let (body, content_type) = match encoding {
            Encoding::Json => (json, "application/json"),
            Encoding::Form => {
                let mut form = b"payload=".to_vec();
                form.extend(form_urlencoded::byte_serialize(&json).flat_map(str::bytes));
                (form, "application/x-www-form-urlencoded")
            }
        };
        let target_id = self.payload["repository"]["id"]
            .as_u64()
            .unwrap_or(1)
            .to_string();
        let headers = vec![
            ("Accept".to_owned(), "*/*".to_owned()),
            (
                "User-Agent".to_owned(),
                "GitHub-Hookshot/8a2e4f1".to_owned(),
            ),
            ("X-GitHub-Delivery".to_owned(), self.id.clone()),
            ("X-GitHub-Event".to_owned(), self.event.clone()),
            ("X-GitHub-Hook-ID".to_owned(), "512345678".to_owned()),
            ("X-GitHub-Hook-Installation-Target-ID".to_owned(), target_id),
            (
                "X-GitHub-Hook-Installation-Target-Type".to_owned(),
                "repository".to_owned(),
            ),
            ("X-Hub-Signature-256".to_owned(), signature(secret, &body)),
            ("Content-Type".to_owned(), content_type.to_owned()),
        ];
        Signed {
            event: self.event.clone(),
            id: self.id.clone(),
            headers,
            body,
            encoding,
        }
    }
}

/// `sha256=<hex HMAC-SHA256 of body with secret>`, as in `X-Hub-Signature-256`.
pub fn signature(secret: &[u8], body: &[u8]) -> String {
    let mut mac = Hmac::<Sha256>::new_from_slice(secret).expect("HMAC takes a key of any length");
    mac.update(body);
    format!("sha256={}", hex::encode(mac.finalize().into_bytes()))
}

/// Whether `header` (an `X-Hub-Signature-256` value) signs `body` with
/// `secret`, compared in constant time.
pub fn verify(secret: &[u8], body: &[u8], header: &str) -> bool {
    let Some(sig) = header
        .strip_prefix("sha256=")
        .and_then(|h| hex::decode(h).ok())
    else {
        return false;
    };
    let mut mac = Hmac::<Sha256>::new_from_slice(secret).expect("HMAC takes a key of any length");
    mac.update(body);
    mac.verify_slice(&sig).is_ok()
}

/// POSTs a signed delivery to `url` (blocking); the receiver's answer.
pub fn post(url: &str, signed: &Signed) -> Result<Answer, String> {
    let headers: Vec<(&str, &str)> = signed
        .headers
        .iter()
        .map(|(n, v)| (n.as_str(), v.as_str()))
        .collect();
    http::send_blocking(
        Method::POST,
        url,
        &headers,
        signed.body.clone(),
        Duration::from_secs(30),
    )
}

/// A random delivery id shaped as GitHub's (a version-4 UUID).
pub fn delivery_id() -> String {
    use rand::{Rng, SeedableRng};
    let mut b: [u8; 16] = rand::rngs::StdRng::from_os_rng().random();
    b[6] = (b[6] & 0x0f) | 0x40;
    b[8] = (b[8] & 0x3f) | 0x80;
    let hex = hex::encode(b);
    format!(
        "{}-{}-{}-{}-{}",
        &hex[..8],
        &hex[8..12],
        &hex[12..16],
        &hex[16..20],
        &hex[20..]
    )
}

/// The examples by event: payload and key order, read once.
fn loaded() -> &'static BTreeMap<String, Vec<(Value, Shape)>> {
    static LOADED: OnceLock<BTreeMap<String, Vec<(Value, Shape)>>> = OnceLock::new();
    LOADED.get_or_init(|| {
        let path = examples_path();
        let text = std::fs::read_to_string(&path).unwrap_or_else(|e| {
            panic!(
                "cannot read {} ({e}): install the test's npm packages (`make deps`)",
                path.display()
            )
        });
        let events: Value = serde_json::from_str(&text).expect("index.json is JSON");
        let shapes: Shape = serde_json::from_str(&text).expect("index.json is JSON");
        let mut out: BTreeMap<String, Vec<(Value, Shape)>> = BTreeMap::new();
        for (idx, event) in events.as_array().into_iter().flatten().enumerate() {
            let name = event["name"].as_str().unwrap_or_default().to_owned();
            let event_shape = shapes.index(idx);
            let example_shapes = event_shape.field("examples");
            for (ex_idx, example) in event["examples"]
                .as_array()
                .into_iter()
                .flatten()
                .enumerate()
            {
                out.entry(name.clone())
                    .or_default()
                    .push((example.clone(), example_shapes.index(ex_idx).clone()));
            }
        }
        out
    })
}

fn set_pointer(root: &mut Value, pointer: &str, value: Value) {
    let mut at = root;
    let parts: Vec<&str> = pointer.split('/').skip(1).collect();
    let Some((last, path)) = parts.split_last() else {
        *at = value;
        return;
    };
    for part in path {
        if !at.is_object() && !at.is_array() {
            *at = json!({});
        }
        at = match at {
            Value::Array(items) => {
                let idx: usize = part.parse().expect("an array index in the pointer");
                &mut items[idx]
            }
            _ => at
                .as_object_mut()
                .expect("made an object above")
                .entry((*part).to_owned())
                .or_insert(Value::Null),
        };
    }
    match at {
        Value::Array(items) => {
            let idx: usize = last.parse().expect("an array index in the pointer");
            items[idx] = value;
        }
        Value::Object(map) => {
            map.insert((*last).to_owned(), value);
        }
        other => {
            let mut map = serde_json::Map::new();
            map.insert((*last).to_owned(), value);
            *other = Value::Object(map);
        }
    }
}

/// The key order of a JSON text, read without keeping the values.
#[derive(Clone, Debug, Default)]
enum Shape {
    #[default]
    Leaf,
    Object(Vec<(String, Shape)>),
    Array(Vec<Shape>),
}

static LEAF: Shape = Shape::Leaf;

impl Shape {
    fn field(&self, key: &str) -> &Shape {
        match self {
            Shape::Object(fields) => fields
                .iter()
                .find(|(k, _)| k == key)
                .map_or(&LEAF, |(_, s)| s),
            _ => &LEAF,
        }
    }

    /// Element `idx`'s shape; a new element takes the first one's.
    fn index(&self, idx: usize) -> &Shape {
        match self {
            Shape::Array(items) => items.get(idx).or(items.first()).unwrap_or(&LEAF),
            _ => &LEAF,
        }
    }
}

impl<'de> Deserialize<'de> for Shape {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct ShapeVisitor;
        impl<'de> Visitor<'de> for ShapeVisitor {
            type Value = Shape;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("JSON")
            }
            fn visit_bool<E: de::Error>(self, _: bool) -> Result<Shape, E> {
                Ok(Shape::Leaf)
            }
            fn visit_i64<E: de::Error>(self, _: i64) -> Result<Shape, E> {
                Ok(Shape::Leaf)
            }
            fn visit_u64<E: de::Error>(self, _: u64) -> Result<Shape, E> {
                Ok(Shape::Leaf)
            }
            fn visit_f64<E: de::Error>(self, _: f64) -> Result<Shape, E> {
                Ok(Shape::Leaf)
            }
            fn visit_str<E: de::Error>(self, _: &str) -> Result<Shape, E> {
                Ok(Shape::Leaf)
            }
            fn visit_unit<E: de::Error>(self) -> Result<Shape, E> {
                Ok(Shape::Leaf)
            }
            fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Shape, A::Error> {
                let mut items = Vec::new();
                while let Some(item) = seq.next_element::<Shape>()? {
                    items.push(item);
                }
                Ok(Shape::Array(items))
            }
            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Shape, A::Error> {
                let mut fields = Vec::new();
                while let Some((key, value)) = map.next_entry::<String, Shape>()? {
                    fields.push((key, value));
                }
                Ok(Shape::Object(fields))
            }
        }
        deserializer.deserialize_any(ShapeVisitor)
    }
}

/// Compact JSON as `JSON.stringify` writes it, objects in `shape`'s order
/// (keys it does not know come after, in the map's order).
fn to_js_json(value: &Value, shape: &Shape) -> Vec<u8> {
    let mut out = Vec::new();
    write_js(value, shape, &mut out);
    out
}

fn write_js(value: &Value, shape: &Shape, out: &mut Vec<u8>) {
    match value {
        Value::Null => out.extend_from_slice(b"null"),
        Value::Bool(b) => out.extend_from_slice(if *b { b"true" } else { b"false" }),
        Value::Number(n) => out.extend_from_slice(js_number(n).as_bytes()),
        // serde_json escapes exactly what JSON.stringify escapes: `"`, `\`
        // and control characters (\b \f \n \r \t, else \u00xx lowercase).
        Value::String(s) => serde_json::to_writer(&mut *out, s).expect("writing to a Vec"),
        Value::Array(items) => {
            out.push(b'[');
            for (idx, item) in items.iter().enumerate() {
                if idx > 0 {
                    out.push(b',');
                }
                write_js(item, shape.index(idx), out);
            }
            out.push(b']');
        }
        Value::Object(map) => {
            let known: Vec<&str> = match shape {
                Shape::Object(fields) => fields.iter().map(|(k, _)| k.as_str()).collect(),
                _ => Vec::new(),
            };
            let order = known
                .iter()
                .copied()
                .filter(|k| map.contains_key(*k))
                .chain(
                    map.keys()
                        .map(String::as_str)
                        .filter(|k| !known.contains(k)),
                );
            out.push(b'{');
            for (idx, key) in order.enumerate() {
                if idx > 0 {
                    out.push(b',');
                }
                serde_json::to_writer(&mut *out, key).expect("writing to a Vec");
                out.push(b':');
                write_js(&map[key], shape.field(key), out);
            }
            out.push(b'}');
        }
    }
}

/// A number as JavaScript prints it: integral values without `.0`,
/// exponents from 1e21 and below 1e-6 as `1e+21` and `1e-7`.
fn js_number(n: &serde_json::Number) -> String {
    if let Some(i) = n.as_i64() {
        return i.to_string();
    }
    if let Some(u) = n.as_u64() {
        return u.to_string();
    }
    let f = n.as_f64().unwrap_or(0.0);
    let abs = f.abs();
    if f == 0.0 {
        "0".to_owned()
    } else if (1e-6..1e21).contains(&abs) {
        // Rust's shortest round-trip form; integral floats print without
        // a fraction, as in JavaScript.
        let s = format!("{f}");
        s.strip_suffix(".0").map(str::to_owned).unwrap_or(s)
    } else {
        let s = format!("{f:e}");
        match s.split_once('e') {
            Some((mantissa, exp)) if !exp.starts_with('-') => format!("{mantissa}e+{exp}"),
            _ => s,
        }
    }
}
