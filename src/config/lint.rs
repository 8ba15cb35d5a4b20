//! Reading a config document so that one run names every mistake.
//!
//! serde stops at the first error. To go on, the document is also read as
//! a plain YAML tree; each error found is recorded, the tree is repaired at
//! that spot (an unknown key removed, a bad value dropped so its default
//! applies, or replaced by a stand-in when the field is required) and read
//! again, until it deserializes. The semantic checks then run on what was
//! read, leaving out what sits under a repaired spot (it would only echo
//! the stand-in). Every error and warning is given its line and column by
//! walking the original text to its path. A valid document is read once,
//! as before: the repair loop runs only when there is something to report.

use super::{Config, FieldError, Location, Role};
use serde::de::{self, DeserializeSeed, Deserializer, IgnoredAny, MapAccess, SeqAccess, Visitor};
use serde_yaml::Value;
use std::collections::{BTreeSet, HashMap, VecDeque};
use std::fmt::{self, Write as _};

/// What reading and checking a document found.
#[derive(Debug, Default)]
pub struct Checked {
    /// The config, when there is no error.
    pub config: Option<Config>,
    /// Every error: syntax, unknown fields, wrong types, bad values,
    /// semantic problems; in document order.
    pub errors: Vec<FieldError>,
    /// What is allowed but most likely a mistake; in document order.
    pub warnings: Vec<FieldError>,
}

/// One step of a field path.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) enum Seg {
    Key(String),
    Index(usize),
}

/// `routes[0].match.headers[1]`, as the semantic checks write paths.
pub(crate) fn path_string(segs: &[Seg]) -> String {
    let mut s = String::new();
    for seg in segs {
        match seg {
            Seg::Key(k) => {
                if !s.is_empty() {
                    s.push('.');
                }
                s.push_str(k);
            }
            Seg::Index(i) => {
                let _ = write!(s, "[{i}]");
            }
        }
    }
    s
}

/// The inverse of `path_string` (a key holding `.` or `[` is split, which
/// only makes its location coarser).
pub(crate) fn parse_path(p: &str) -> Vec<Seg> {
    let mut segs = Vec::new();
    if p.is_empty() {
        return segs;
    }
    for part in p.split('.') {
        let (name, mut rest) = part.split_at(part.find('[').unwrap_or(part.len()));
        if !name.is_empty() {
            segs.push(Seg::Key(name.to_string()));
        }
        while let Some(r) = rest.strip_prefix('[') {
            let Some((n, tail)) = r.split_once(']') else {
                segs.push(Seg::Key(rest.to_string()));
                break;
            };
            match n.parse() {
                Ok(i) => segs.push(Seg::Index(i)),
                Err(_) => segs.push(Seg::Key(format!("[{n}]"))),
            }
            rest = tail;
        }
    }
    segs
}

/// One serde error: where and what.
struct Found {
    segs: Vec<Seg>,
    message: String,
    at: Option<Location>,
}

fn parse_one(text: &str) -> Result<Config, Found> {
    let de = serde_yaml::Deserializer::from_str(text);
    serde_path_to_error::deserialize(de).map_err(|e| {
        use serde_path_to_error::Segment;
        let mut segs = Vec::new();
        for s in e.path() {
            match s {
                Segment::Seq { index } => segs.push(Seg::Index(*index)),
                Segment::Map { key } => segs.push(Seg::Key(key.clone())),
                Segment::Enum { .. } => {}
                Segment::Unknown => break,
            }
        }
        let inner = e.into_inner();
        let at = inner.location().map(|l| Location {
            line: l.line(),
            column: l.column(),
        });
        let message = bare_message(&inner.to_string(), &segs);
        Found { segs, message, at }
    })
}

/// serde_yaml's message without its path prefix and ` at line N column M`.
fn bare_message(msg: &str, segs: &[Seg]) -> String {
    let mut out = msg.to_string();
    for p in [
        path_string(segs),
        path_string(&segs[..segs.len().saturating_sub(1)]),
    ] {
        if !p.is_empty()
            && let Some(rest) = out.strip_prefix(&format!("{p}: "))
        {
            out = rest.to_string();
            break;
        }
    }
    for marker in [" at line ", " at position "] {
        while let Some(i) = out.find(marker) {
            let tail = &out[i + marker.len()..];
            let mut end = tail
                .find(|c: char| !c.is_ascii_digit())
                .unwrap_or(tail.len());
            if let Some(col) = tail[end..].strip_prefix(" column ") {
                end +=
                    " column ".len() + col.find(|c: char| !c.is_ascii_digit()).unwrap_or(col.len());
            }
            if end == 0 {
                break;
            }
            out.replace_range(i..i + marker.len() + end, "");
        }
    }
    out
}

/// The names between backticks after `expected` in a serde message.
fn expected_names(msg: &str) -> Vec<&str> {
    let Some((_, list)) = msg.split_once("expected ") else {
        return Vec::new();
    };
    list.split('`').skip(1).step_by(2).collect()
}

/// The first name between backticks.
fn quoted(msg: &str) -> Option<&str> {
    msg.split('`').nth(1)
}

/// Optimal string alignment distance (a swap of two letters counts one).
fn distance(a: &str, b: &str) -> usize {
    let a: Vec<char> = a.chars().collect();
    let b: Vec<char> = b.chars().collect();
    let mut d = vec![vec![0usize; b.len() + 1]; a.len() + 1];
    for (i, row) in d.iter_mut().enumerate() {
        row[0] = i;
    }
    for (j, cell) in d[0].iter_mut().enumerate() {
        *cell = j;
    }
    for i in 1..=a.len() {
        for j in 1..=b.len() {
            let cost = usize::from(a[i - 1] != b[j - 1]);
            let mut v = (d[i - 1][j] + 1)
                .min(d[i][j - 1] + 1)
                .min(d[i - 1][j - 1] + cost);
            if i > 1 && j > 1 && a[i - 1] == b[j - 2] && a[i - 2] == b[j - 1] {
                v = v.min(d[i - 2][j - 2] + 1);
            }
            d[i][j] = v;
        }
    }
    d[a.len()][b.len()]
}

/// The allowed name nearest to `got`, if it is a near miss (at most two
/// edits, and fewer edits than `got` has letters).
pub(crate) fn near_miss<'a>(got: &str, allowed: &[&'a str]) -> Option<&'a str> {
    let got_l = got.to_ascii_lowercase();
    allowed
        .iter()
        .map(|a| (distance(&got_l, a), *a))
        .filter(|(d, _)| *d <= 2 && *d < got.chars().count())
        .min_by_key(|(d, _)| *d)
        .map(|(_, a)| a)
}

/// For an unknown field or variant that is a near miss: what was meant.
fn suggestion(message: &str) -> Option<&str> {
    if !(message.starts_with("unknown field") || message.starts_with("unknown variant")) {
        return None;
    }
    near_miss(quoted(message)?, &expected_names(message))
}

/// Adds "did you mean" to unknown field and variant messages.
fn explain(message: &str) -> String {
    if let Some(m) = suggestion(message) {
        let what = if message.starts_with("unknown field") {
            "unknown field"
        } else {
            "unknown variant"
        };
        return format!(
            "{what} `{}`: did you mean `{m}`?",
            quoted(message).unwrap_or("")
        );
    }
    if message.starts_with("unknown field `on`") {
        return format!("{message} (retry conditions are `retry_on`)");
    }
    message.to_string()
}

fn node<'a>(v: &'a Value, segs: &[Seg]) -> Option<&'a Value> {
    let Some((first, rest)) = segs.split_first() else {
        return Some(v);
    };
    let v = match v {
        Value::Tagged(t) => &t.value,
        v => v,
    };
    let next = match (first, v) {
        (Seg::Key(k), Value::Mapping(m)) => m.iter().find(|(key, _)| key_matches(key, k))?.1,
        (Seg::Index(i), Value::Sequence(s)) => s.get(*i)?,
        _ => return None,
    };
    node(next, rest)
}

/// serde's untagged enums say only that no form matched: say what the
/// forms are, or read a mapping as the mapping form to say what is wrong
/// inside it.
fn refine_untagged(v: &Value, segs: &[Seg], message: &str) -> Option<(Vec<Seg>, String)> {
    let what = message.strip_prefix("data did not match any variant of untagged enum ")?;
    let n = node(v, segs)?;
    match what {
        "ListenerTlsField" if n.is_mapping() => {
            let e = serde_path_to_error::deserialize::<_, super::ListenerTls>(n.clone()).err()?;
            let mut at = segs.to_vec();
            for s in e.path() {
                match s {
                    serde_path_to_error::Segment::Seq { index } => at.push(Seg::Index(*index)),
                    serde_path_to_error::Segment::Map { key } => at.push(Seg::Key(key.clone())),
                    _ => {}
                }
            }
            let msg = bare_message(&e.into_inner().to_string(), &[]);
            Some((at, msg))
        }
        "ListenerTlsField" => Some((
            segs.to_vec(),
            "expected a mode (strict, permissive, disabled) or { mode: terminate, certificates: [...] }".into(),
        )),
        "Hosts" => Some((
            segs.to_vec(),
            "expected a host (`orders.default.svc`, `*.example.com`, `*`) or a list of them".into(),
        )),
        _ => None,
    }
}

enum Kind {
    UnknownField,
    MissingField(String),
    Other,
}

fn kind(message: &str) -> Kind {
    if message.starts_with("unknown field `") {
        Kind::UnknownField
    } else if message.starts_with("missing field `")
        && let Some(k) = quoted(message)
    {
        Kind::MissingField(k.to_string())
    } else {
        Kind::Other
    }
}

fn key_matches(k: &Value, want: &str) -> bool {
    match k {
        Value::String(s) => s == want,
        Value::Number(n) => n.to_string() == want,
        Value::Bool(b) => b.to_string() == want,
        Value::Null => want == "null" || want == "~",
        _ => false,
    }
}

fn node_mut<'a>(v: &'a mut Value, segs: &[Seg]) -> Option<&'a mut Value> {
    let Some((first, rest)) = segs.split_first() else {
        return Some(v);
    };
    let v = match v {
        Value::Tagged(t) => &mut t.value,
        v => v,
    };
    let next = match (first, v) {
        (Seg::Key(k), Value::Mapping(m)) => m
            .iter_mut()
            .find(|(key, _)| key_matches(key, k))
            .map(|(_, v)| v)?,
        (Seg::Index(i), Value::Sequence(s)) => s.get_mut(*i)?,
        _ => return None,
    };
    node_mut(next, rest)
}

/// How a spot in the tree is repaired.
#[derive(Clone, PartialEq)]
enum Fix {
    Remove,
    Put(Value),
}

/// Removes or sets the node at `segs` (its last step a key of a mapping or
/// an index of a sequence); false when it is not there to change.
fn apply(v: &mut Value, segs: &[Seg], fix: &Fix) -> bool {
    let Some((last, parent)) = segs.split_last() else {
        return match fix {
            Fix::Put(n) => {
                *v = n.clone();
                true
            }
            Fix::Remove => false,
        };
    };
    let Some(p) = node_mut(v, parent) else {
        return false;
    };
    let p = match p {
        Value::Tagged(t) => &mut t.value,
        p => p,
    };
    match (last, p, fix) {
        (Seg::Key(k), Value::Mapping(m), Fix::Remove) => {
            let key = m.keys().find(|key| key_matches(key, k)).cloned();
            key.is_some_and(|key| m.remove(&key).is_some())
        }
        (Seg::Key(k), Value::Mapping(m), Fix::Put(n)) => {
            let key = m
                .keys()
                .find(|key| key_matches(key, k))
                .cloned()
                .unwrap_or_else(|| Value::String(k.clone()));
            m.insert(key, n.clone());
            true
        }
        (Seg::Index(i), Value::Sequence(s), Fix::Put(n)) if *i < s.len() => {
            s[*i] = n.clone();
            true
        }
        _ => false,
    }
}

fn reparse(v: &Value) -> Result<Config, Found> {
    match serde_yaml::to_string(v) {
        Ok(text) => parse_one(&text),
        Err(e) => Err(Found {
            segs: Vec::new(),
            message: e.to_string(),
            at: None,
        }),
    }
}

/// Stand-ins tried, in order, for a value that cannot just be dropped:
/// an address (a string too), a number, a flag, a duration, a list, a
/// mapping (a struct whose fields have defaults).
fn stand_ins() -> Vec<Value> {
    vec![
        Value::String("0.0.0.0:0".into()),
        Value::Number(0.into()),
        Value::Bool(false),
        Value::String("1s".into()),
        Value::Sequence(Vec::new()),
        Value::Mapping(Default::default()),
    ]
}

/// Whether a repair at `target` cleared the error there.
fn progressed(r: &Result<Config, Found>, target: &[Seg], fix: &Fix) -> bool {
    let Err(e) = r else { return true };
    if e.segs == target {
        // A mapping put for a struct now misses its required fields: that
        // is the next repair, further in.
        return matches!(fix, Fix::Put(Value::Mapping(_)))
            && e.message.starts_with("missing field");
    }
    if *fix == Fix::Remove
        && let Some((Seg::Key(k), parent)) = target.split_last()
        && e.segs == parent
        && e.message.starts_with(&format!("missing field `{k}`"))
    {
        return false;
    }
    true
}

/// Tries repairs at `target` until one clears the error there.
fn repair(
    v: &Value,
    target: &[Seg],
    message: &str,
    removable: bool,
    budget: &mut usize,
) -> Option<(Value, Result<Config, Found>, Fix)> {
    let mut queue: VecDeque<Fix> = VecDeque::new();
    let mut tried: Vec<Fix> = Vec::new();
    if message.starts_with("unknown variant")
        && let Some(first) = expected_names(message).first()
    {
        let got = quoted(message).unwrap_or("");
        let best = near_miss(got, &expected_names(message)).unwrap_or(first);
        queue.push_back(Fix::Put(Value::String(best.to_string())));
    }
    if removable {
        queue.push_back(Fix::Remove);
    }
    queue.extend(stand_ins().into_iter().map(Fix::Put));
    while let Some(fix) = queue.pop_front() {
        if tried.contains(&fix) || *budget == 0 {
            continue;
        }
        *budget -= 1;
        tried.push(fix.clone());
        let mut next = v.clone();
        if !apply(&mut next, target, &fix) {
            continue;
        }
        let r = reparse(&next);
        if progressed(&r, target, &fix) {
            return Some((next, r, fix));
        }
        // A stand-in string for an enum: its message lists the variants.
        if let Err(e) = &r
            && e.segs == target
            && e.message.starts_with("unknown variant")
            && let Some(first) = expected_names(&e.message).first()
        {
            queue.push_front(Fix::Put(Value::String((*first).to_string())));
        }
    }
    None
}

/// What the repair loop found.
pub(crate) struct Parsed {
    pub config: Option<Config>,
    pub errors: Vec<FieldError>,
    /// Paths under which the semantic checks would only see repairs: each
    /// error's, and the list item of each stand-in.
    pub covered: Vec<Vec<Seg>>,
    /// Paths at which (not under which) they would only see repairs: the
    /// mapping that held an unknown field.
    pub echoes: Vec<Vec<Seg>>,
}

fn under(path: &[Seg], covered: &[Vec<Seg>]) -> bool {
    covered.iter().any(|c| path.starts_with(c))
}

/// The list item (or top-level section) a path belongs to.
fn item_of(segs: &[Seg]) -> Vec<Seg> {
    match segs.iter().rposition(|s| matches!(s, Seg::Index(_))) {
        Some(i) => segs[..=i].to_vec(),
        None => segs[..segs.len().min(1)].to_vec(),
    }
}

/// Most errors the loop records; beyond, the file is not a config.
const MAX_ERRORS: usize = 100;
/// Most re-reads of the document the loop may spend.
const MAX_PARSES: usize = 600;

pub(crate) fn parse_all(text: &str) -> Parsed {
    let first = match parse_one(text) {
        Ok(c) => {
            return Parsed {
                config: Some(c),
                errors: Vec::new(),
                covered: Vec::new(),
                echoes: Vec::new(),
            };
        }
        Err(f) => f,
    };
    let mut value: Value = match serde_yaml::from_str(text) {
        Ok(v) => v,
        Err(e) => {
            // Not YAML (or not one document): nothing further can be read.
            let at = e.location().map(|l| Location {
                line: l.line(),
                column: l.column(),
            });
            let message = format!("not valid YAML: {}", bare_message(&e.to_string(), &[]));
            return Parsed {
                config: None,
                errors: vec![FieldError {
                    path: String::new(),
                    message,
                    at: at.or(first.at),
                }],
                covered: Vec::new(),
                echoes: Vec::new(),
            };
        }
    };
    let mut errors: Vec<FieldError> = Vec::new();
    // What an error reported already explains: errors under it are echoes
    // of its repair.
    let mut covered: Vec<Vec<Seg>> = Vec::new();
    let mut tainted: Vec<Vec<Seg>> = Vec::new();
    let mut echoes: Vec<Vec<Seg>> = Vec::new();
    let mut budget = MAX_PARSES;
    let mut current = first;
    let mut round = 0usize;
    loop {
        let segs = current.segs.clone();
        let k = kind(&current.message);
        // What the repair covers: errors under it are its echoes.
        let cover = match &k {
            Kind::MissingField(f) => {
                let mut c = segs.clone();
                c.push(Seg::Key(f.clone()));
                c
            }
            _ => segs.clone(),
        };
        if !under(&cover, &covered) {
            let (shown, message) = refine_untagged(&value, &segs, &current.message)
                .unwrap_or_else(|| (segs.clone(), current.message.clone()));
            // An unknown field is said to be in its mapping, found at its key.
            let unknown = matches!(kind(&message), Kind::UnknownField);
            let report = if unknown {
                shown[..shown.len().saturating_sub(1)].to_vec()
            } else {
                shown.clone()
            };
            if unknown {
                // The typo's mapping, and the field it meant, would only
                // say that the field is missing.
                echoes.push(report.clone());
                if let Some(m) = suggestion(&message) {
                    let mut meant = report.clone();
                    meant.push(Seg::Key(m.to_string()));
                    tainted.push(meant);
                }
            }
            let at = locate(text, &shown, unknown).or(if round == 0 { current.at } else { None });
            errors.push(FieldError {
                path: path_string(&report),
                message: explain(&message),
                at,
            });
            covered.push(cover.clone());
        }
        round += 1;
        if errors.len() >= MAX_ERRORS || budget == 0 {
            errors.push(FieldError::new(
                String::new(),
                format!(
                    "stopped after {} errors; fix these and run again",
                    errors.len()
                ),
            ));
            break;
        }
        let next = match k {
            Kind::UnknownField => {
                budget -= 1;
                if !apply(&mut value, &segs, &Fix::Remove) {
                    break;
                }
                reparse(&value)
            }
            Kind::MissingField(_) | Kind::Other => {
                let target = cover;
                let removable = matches!(target.last(), Some(Seg::Key(_)))
                    && !matches!(k, Kind::MissingField(_));
                let Some((v, r, fix)) =
                    repair(&value, &target, &current.message, removable, &mut budget)
                else {
                    break;
                };
                if fix != Fix::Remove {
                    // A stand-in: the item's other checks would see it.
                    tainted.push(item_of(&target));
                }
                value = v;
                r
            }
        };
        match next {
            Ok(c) => {
                covered.append(&mut tainted);
                return Parsed {
                    config: Some(c),
                    errors,
                    covered,
                    echoes,
                };
            }
            Err(f) => current = f,
        }
    }
    Parsed {
        config: None,
        errors,
        covered,
        echoes,
    }
}

// ---- locations ----

const HERE: &str = "\u{1}outrigger:here";

/// The line and column of the node at `segs` (with `key`: of its key) in
/// `text`; the nearest enclosing node that is there when it is not.
pub(crate) fn locate(text: &str, segs: &[Seg], key: bool) -> Option<Location> {
    for n in (0..=segs.len()).rev() {
        let de = serde_yaml::Deserializer::from_str(text);
        let want_key = key && n == segs.len();
        if let Err(e) = (Find {
            path: &segs[..n],
            key: want_key,
        })
        .deserialize(de)
            && e.to_string().contains(HERE)
            && let Some(l) = e.location()
        {
            return Some(Location {
                line: l.line(),
                column: l.column(),
            });
        }
    }
    None
}

/// Walks to `path`, then fails there: serde_yaml marks the error with the
/// position of the event it stood on.
struct Find<'a> {
    path: &'a [Seg],
    key: bool,
}

impl<'de> DeserializeSeed<'de> for Find<'_> {
    type Value = ();
    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<(), D::Error> {
        d.deserialize_any(self)
    }
}

impl Find<'_> {
    fn leaf<E: de::Error>(&self) -> Result<(), E> {
        if self.path.is_empty() {
            Err(E::custom(HERE))
        } else {
            Ok(())
        }
    }
}

impl<'de> Visitor<'de> for Find<'_> {
    type Value = ();
    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("any YAML node")
    }
    fn visit_map<A: MapAccess<'de>>(self, mut a: A) -> Result<(), A::Error> {
        let Some((first, rest)) = self.path.split_first() else {
            return Err(de::Error::custom(HERE));
        };
        let Seg::Key(want) = first else {
            return Ok(());
        };
        let at_key = self.key && rest.is_empty();
        while let Some(k) = a.next_key_seed(KeyName { want, fail: at_key })? {
            if k {
                return a.next_value_seed(Find {
                    path: rest,
                    key: self.key,
                });
            }
            a.next_value::<IgnoredAny>()?;
        }
        Ok(())
    }
    fn visit_seq<A: SeqAccess<'de>>(self, mut a: A) -> Result<(), A::Error> {
        let Some((first, rest)) = self.path.split_first() else {
            return Err(de::Error::custom(HERE));
        };
        let Seg::Index(want) = first else {
            return Ok(());
        };
        for _ in 0..*want {
            if a.next_element::<IgnoredAny>()?.is_none() {
                return Ok(());
            }
        }
        a.next_element_seed(Find {
            path: rest,
            key: self.key,
        })?;
        Ok(())
    }
    fn visit_str<E: de::Error>(self, _: &str) -> Result<(), E> {
        self.leaf()
    }
    fn visit_u64<E: de::Error>(self, _: u64) -> Result<(), E> {
        self.leaf()
    }
    fn visit_i64<E: de::Error>(self, _: i64) -> Result<(), E> {
        self.leaf()
    }
    fn visit_f64<E: de::Error>(self, _: f64) -> Result<(), E> {
        self.leaf()
    }
    fn visit_bool<E: de::Error>(self, _: bool) -> Result<(), E> {
        self.leaf()
    }
    fn visit_unit<E: de::Error>(self) -> Result<(), E> {
        self.leaf()
    }
}

/// A mapping key: true when it is the one wanted (failing on it when
/// `fail`, to mark the key itself).
struct KeyName<'a> {
    want: &'a str,
    fail: bool,
}

impl<'de> DeserializeSeed<'de> for KeyName<'_> {
    type Value = bool;
    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<bool, D::Error> {
        d.deserialize_any(self)
    }
}

impl KeyName<'_> {
    fn is<E: de::Error>(&self, s: &str) -> Result<bool, E> {
        if s == self.want {
            if self.fail {
                return Err(E::custom(HERE));
            }
            return Ok(true);
        }
        Ok(false)
    }
}

impl<'de> Visitor<'de> for KeyName<'_> {
    type Value = bool;
    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a mapping key")
    }
    fn visit_str<E: de::Error>(self, s: &str) -> Result<bool, E> {
        self.is(s)
    }
    fn visit_u64<E: de::Error>(self, n: u64) -> Result<bool, E> {
        self.is(&n.to_string())
    }
    fn visit_i64<E: de::Error>(self, n: i64) -> Result<bool, E> {
        self.is(&n.to_string())
    }
    fn visit_f64<E: de::Error>(self, n: f64) -> Result<bool, E> {
        self.is(&n.to_string())
    }
    fn visit_bool<E: de::Error>(self, b: bool) -> Result<bool, E> {
        self.is(&b.to_string())
    }
    fn visit_unit<E: de::Error>(self) -> Result<bool, E> {
        self.is("null")
    }
    fn visit_map<A: MapAccess<'de>>(self, mut a: A) -> Result<bool, A::Error> {
        while a.next_entry::<IgnoredAny, IgnoredAny>()?.is_some() {}
        Ok(false)
    }
    fn visit_seq<A: SeqAccess<'de>>(self, mut a: A) -> Result<bool, A::Error> {
        while a.next_element::<IgnoredAny>()?.is_some() {}
        Ok(false)
    }
}

// ---- the whole check ----

/// Most errors and warnings given a location (each costs a read of the
/// text); more than that are listed without.
const MAX_LOCATED: usize = 100;

pub(crate) fn check(text: &str, warnings: bool) -> Checked {
    let parsed = parse_all(text);
    let mut located = parsed.errors.len();
    let mut locate = |segs: &[Seg], key: bool| {
        located += 1;
        if located > MAX_LOCATED {
            None
        } else {
            locate(text, segs, key)
        }
    };
    let mut errors = parsed.errors;
    let mut warns = Vec::new();
    if let Some(config) = &parsed.config {
        if let Err(semantic) = config.validate() {
            for mut e in semantic.0 {
                let segs = parse_path(&e.path);
                if under(&segs, &parsed.covered) || parsed.echoes.contains(&segs) {
                    continue;
                }
                e.at = locate(&segs, false);
                errors.push(e);
            }
        }
        if warnings {
            for mut w in config.warnings() {
                let segs = parse_path(&w.path);
                if under(&segs, &parsed.covered) {
                    continue;
                }
                w.at = locate(&segs, false);
                warns.push(w);
            }
        }
    }
    if warnings {
        for (segs, mut w) in deprecated_keys(text) {
            w.at = locate(&segs, true);
            warns.push(w);
        }
    }
    let order = |e: &FieldError| e.at.map_or((usize::MAX, 0), |l| (l.line, l.column));
    errors.sort_by_key(order);
    warns.sort_by_key(order);
    Checked {
        config: if errors.is_empty() {
            parsed.config
        } else {
            None
        },
        errors,
        warnings: warns,
    }
}

/// `on:` in a retry: YAML 1.1 tools read it as the boolean `true`.
fn deprecated_keys(text: &str) -> Vec<(Vec<Seg>, FieldError)> {
    let Ok(v) = serde_yaml::from_str::<Value>(text) else {
        return Vec::new();
    };
    let mut out = Vec::new();
    let Some(routes) = v.get("routes").and_then(Value::as_sequence) else {
        return out;
    };
    for (i, r) in routes.iter().enumerate() {
        if r.get("retry").and_then(|rt| rt.get("on")).is_some() {
            let segs = vec![
                Seg::Key("routes".into()),
                Seg::Index(i),
                Seg::Key("retry".into()),
                Seg::Key("on".into()),
            ];
            let w = FieldError::new(
                path_string(&segs),
                "`on` is deprecated, write `retry_on` (YAML 1.1 tools such as PyYAML read a bare `on` as the boolean true)".into(),
            );
            out.push((segs, w));
        }
    }
    out
}

impl Config {
    /// What is allowed but most likely a mistake: a route no request can
    /// reach (an earlier route has the same match on the same listeners),
    /// a cluster with no endpoints. Paths as in `validate`, no location.
    pub fn warnings(&self) -> Vec<FieldError> {
        let mut out = Vec::new();
        let default_listeners: BTreeSet<&str> = self
            .listeners
            .iter()
            .filter(|l| l.role != Role::Inbound)
            .map(|l| l.name.as_str())
            .collect();
        let served: Vec<BTreeSet<&str>> = self
            .routes
            .iter()
            .map(|r| match &r.listeners {
                Some(ls) => ls.iter().map(String::as_str).collect(),
                None => default_listeners.clone(),
            })
            .collect();
        // Routes by match: only routes with the same one are compared.
        let mut same: HashMap<String, Vec<usize>> = HashMap::new();
        for (j, r) in self.routes.iter().enumerate() {
            let earlier = same.entry(match_key(&r.matches)).or_default();
            let first = earlier
                .iter()
                .copied()
                .find(|&i| served[j].is_subset(&served[i]));
            earlier.push(j);
            if served[j].is_empty() {
                continue;
            }
            if let Some(i) = first {
                out.push(FieldError::new(
                    format!("routes[{j}]"),
                    format!(
                        "route `{}` is never used: route `{}` (routes[{i}]) has the same match on the same listeners and comes first",
                        self.routes[j].name, self.routes[i].name
                    ),
                ));
            }
        }
        for (i, c) in self.clusters.iter().enumerate() {
            if c.endpoints.is_empty() {
                out.push(FieldError::new(
                    format!("clusters[{i}]"),
                    format!(
                        "cluster `{}` has no endpoints: requests routed to it get 503",
                        c.name
                    ),
                ));
            }
        }
        out
    }
}

/// A match written in one canonical form: hosts and methods in any order
/// and case, no host the same as `*`.
fn match_key(m: &super::RouteMatch) -> String {
    let mut hosts: Vec<String> = m.host.as_ref().map_or_else(
        || vec!["*".to_string()],
        |h| h.list().iter().map(|h| h.to_ascii_lowercase()).collect(),
    );
    hosts.sort();
    hosts.dedup();
    let mut methods: Vec<String> = m.methods.iter().map(|x| x.to_ascii_uppercase()).collect();
    methods.sort();
    methods.dedup();
    let mut headers: Vec<String> = m
        .headers
        .iter()
        .map(|h| {
            format!(
                "{}={:?}/{:?}/{:?}",
                h.name.to_ascii_lowercase(),
                h.exact,
                h.regex,
                h.present
            )
        })
        .collect();
    headers.sort();
    format!(
        "{hosts:?}|{:?}|{:?}|{:?}|{methods:?}|{headers:?}",
        m.path, m.path_prefix, m.path_regex
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths_round_trip() {
        for p in [
            "",
            "listeners",
            "routes[0].match.headers[1].name",
            "a[0][2].b",
        ] {
            assert_eq!(path_string(&parse_path(p)), p);
        }
    }

    #[test]
    fn near_misses() {
        let allowed = ["timeout", "total_timeout", "retry", "name"];
        assert_eq!(near_miss("tiemout", &allowed), Some("timeout"));
        assert_eq!(near_miss("retyr", &allowed), Some("retry"));
        assert_eq!(near_miss("colour", &allowed), None);
        assert_eq!(distance("ab", "ba"), 1);
    }

    #[test]
    fn messages_lose_path_and_position() {
        let segs = parse_path("clusters[0].colour");
        assert_eq!(
            bare_message(
                "clusters[0]: unknown field `colour`, expected `name` at line 2 column 5",
                &segs
            ),
            "unknown field `colour`, expected `name`"
        );
        assert_eq!(
            bare_message(
                "did not find expected node content at line 2 column 1, while parsing a flow node",
                &[]
            ),
            "did not find expected node content, while parsing a flow node"
        );
    }

    #[test]
    fn a_file_of_mistakes_stops_at_a_bound() {
        let mut t = String::from("listeners:\n");
        for i in 0..300 {
            t.push_str(&format!(
                "  - {{ name: l{i}, role: outbound, address: 127.0.0.1:1, colour{i}: red }}\n"
            ));
        }
        let e = Config::from_yaml(&t).unwrap_err().0;
        assert_eq!(e.len(), MAX_ERRORS + 1);
        assert!(
            e[MAX_ERRORS]
                .message
                .starts_with("stopped after 100 errors"),
            "{}",
            e[MAX_ERRORS]
        );
    }

    #[test]
    fn locates_keys_and_values() {
        let t = "listeners:\n  - name: a\n    address: nope\n  - { name: b, colour: red }\n";
        let at = |p: &str, key| locate(t, &parse_path(p), key).map(|l| (l.line, l.column));
        assert_eq!(at("listeners[0].address", false), Some((3, 14)));
        assert_eq!(at("listeners[0].address", true), Some((3, 5)));
        assert_eq!(at("listeners[1].colour", true), Some((4, 16)));
        // Not there: the nearest enclosing node.
        assert_eq!(at("listeners[1].role", false), Some((4, 5)));
    }
}
