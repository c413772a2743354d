//! Kubernetes YAML (files with one or many documents) into typed objects.
//! A document that fails to parse is reported with its file and index and
//! skipped; the others are kept.

use std::{
    collections::{BTreeMap, BTreeSet},
    fs,
    path::{Path, PathBuf},
    sync::Arc,
    time::SystemTime,
};

use imbl::ordmap::DiffItem;
use serde_json::Value;

use super::{Collection, EachKind, ObjKey, Object, Objects, Origin};
use crate::{limits, xds::envoyconfig::ConfigDoc};

/// Why a file or a document of it could not be used.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum DocError {
    /// A syntax error or a breached parser budget: the file ends here.
    #[error("not valid YAML: {0}")]
    NotYaml(String),
    /// This document is not valid YAML (a duplicate key, say); the others are read.
    #[error("not valid YAML (document skipped): {0}")]
    DocumentNotYaml(String),
    /// The file could not be read (the message says why, from `limits::ReadError`).
    #[error("{0}")]
    Unreadable(String),
    #[error("document has no kind")]
    NoKind,
    #[error("metadata.name is missing")]
    NoName,
    /// The document does not fit its kind's schema (serde's message names the field).
    #[error("{0}")]
    Invalid(String),
}

impl DocError {
    /// Whether the whole file is lost, not one document of it.
    pub fn whole_file(&self) -> bool {
        matches!(self, DocError::NotYaml(_) | DocError::Unreadable(_))
    }
}

/// What stays in effect in place of what failed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kept {
    /// The file's previous contents (it no longer parses at all).
    PreviousContents,
    /// The previous version of the object (or of the document) that failed.
    PreviousVersion,
}

/// A document that could not be used.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ParseProblem {
    pub origin: Origin,
    /// `Kind namespace/name` when the document got that far.
    pub object: Option<String>,
    pub error: DocError,
    pub kept: Option<Kept>,
    /// The error, and what stays in effect, as users read it.
    pub message: String,
}

impl ParseProblem {
    pub(crate) fn new(origin: Origin, object: Option<String>, error: DocError) -> Self {
        let message = error.to_string();
        ParseProblem { origin, object, error, kept: None, message }
    }

    fn keep(&mut self, kept: Kept) {
        self.kept = Some(kept);
        self.message.push_str(match kept {
            Kept::PreviousContents => " (its previous contents stay in effect)",
            Kept::PreviousVersion => " (its previous version stays in effect)",
        });
    }
}

impl std::fmt::Display for ParseProblem {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match &self.object {
            Some(o) => write!(f, "{}: {o}: {}", self.origin, self.message),
            None => write!(f, "{}: {}", self.origin, self.message),
        }
    }
}

/// What a directory or file held.
#[derive(Debug, Default)]
pub struct Loaded {
    pub objects: Objects,
    pub problems: Vec<ParseProblem>,
    /// Documents of kinds the agent does not use (Deployments, ...): (origin, kind).
    pub ignored: Vec<(Origin, String)>,
    /// EnvoyConfig documents (and Cilium's kinds), each parsed as it was
    /// read (its JSON value is not kept). Shared like the typed objects: a
    /// document that did not change stays the same `Arc`, so the controller
    /// takes in only documents that did. A persistent vector, like the
    /// objects' maps: handed over as a clone that costs nothing.
    pub configs: imbl::Vector<Arc<ConfigDoc>>,
}

/// Kinds read into [`Loaded::configs`].
pub const CONFIG_KINDS: &[&str] =
    &["EnvoyConfig", "ClusterwideEnvoyConfig", "CiliumEnvoyConfig", "CiliumClusterwideEnvoyConfig"];

/// Parses one document (already JSON) into an object of a kind the agent uses.
pub fn object_from_value(v: Value) -> Result<Option<Object>, DocError> {
    Object::from_value(v).map_err(|e| DocError::Invalid(e.to_string()))
}

fn describe(v: &Value) -> Option<String> {
    let kind = v.get("kind")?.as_str()?;
    let meta = v.get("metadata");
    let name = meta.and_then(|m| m.get("name")).and_then(Value::as_str).unwrap_or("<no name>");
    Some(match meta.and_then(|m| m.get("namespace")).and_then(Value::as_str) {
        Some(ns) => format!("{kind} {ns}/{name}"),
        None => format!("{kind} {name}"),
    })
}

/// Files from this size on are read in parts of whole documents, one per
/// core (at most [`MAX_PARTS`]): 10,000 EnvoyConfigs with their Services
/// written to one file took the agent 1.3 s of parsing on one core.
const PARTS_FROM_BYTES: usize = 1 << 20;
const MAX_PARTS: usize = 4;

/// Parses the documents of one file into `into`. Each document is parsed on
/// its own: one that is not valid YAML (a duplicate key, say) is reported
/// with its index and the others are kept. A syntax error or a breached
/// parser budget (an alias bomb, too deep) ends the file there: it is
/// reported as the file's problem, with `object: None` and the document's
/// index, and what followed is not read.
pub fn load_text(path: &Path, text: &str, into: &mut Loaded) {
    let parts = if text.len() >= PARTS_FROM_BYTES {
        std::thread::available_parallelism().map_or(1, |n| n.get()).min(MAX_PARTS)
    } else {
        1
    };
    load_text_in_parts(path, text, parts, into);
}

/// [`load_text`] with the text cut into up to `parts` parts at document
/// markers, each read on a thread of its own. A document's meaning does not
/// depend on the documents around it (the reader resets its budgets and
/// anchors at each one; a text with directives, the one thing that does
/// carry over, is read whole), so this gives what reading it whole gives
/// whenever no part meets an error; if one does, the whole text is read
/// again in one part, so that which error ends the file, and the positions
/// errors name, are those of the whole text.
fn load_text_in_parts(path: &Path, text: &str, parts: usize, into: &mut Loaded) {
    let path: Arc<Path> = Arc::from(path);
    let cut = document_parts(text, parts);
    if cut.len() > 1 {
        let read: Option<Vec<PartRead>> =
            crate::par::each_part(&cut, |t| read_part(&path, t)).into_iter().map(Option::flatten).collect();
        tracing::debug!(path = %path.display(), bytes = text.len(), parts = cut.len(), ok = read.is_some(), "read in parts");
        if let Some(read) = read {
            let mut offset = 0;
            for part in read {
                let n = part.len();
                for (i, items) in part.into_iter().enumerate() {
                    let origin = Origin::File { path: path.clone(), doc: offset + i };
                    for item in items {
                        place(item, &origin, into);
                    }
                }
                offset += n;
            }
            return;
        }
    }
    let mut reader = std::io::Cursor::new(text.as_bytes());
    let mut docs = serde_saphyr::read_with_options::<_, Value>(&mut reader, reader_options()).enumerate().peekable();
    while let Some((doc, v)) = docs.next() {
        let origin = Origin::File { path: path.clone(), doc };
        match v {
            Ok(v) => read_value(&origin, v, &mut |item| place(item, &origin, into)),
            Err(e) => {
                // The parser stops at a syntax error or a breached budget;
                // then nothing follows and the file counts as broken.
                let error = if docs.peek().is_none() {
                    DocError::NotYaml(e.to_string())
                } else {
                    DocError::DocumentNotYaml(e.to_string())
                };
                into.problems.push(ParseProblem::new(origin, None, error));
            }
        }
    }
}

fn reader_options() -> serde_saphyr::Options {
    let mut options = limits::yaml_options();
    if let Some(b) = options.budget.as_mut() {
        b.max_reader_input_bytes = None; // the file's size was checked when it was read
    }
    options
}

/// What a part read: for each of its documents in order, what it holds.
type PartRead = Vec<Vec<Item>>;

/// Reads one part of a text; None if any document of it is not valid YAML.
fn read_part(path: &Arc<Path>, text: &str) -> Option<PartRead> {
    let mut reader = std::io::Cursor::new(text.as_bytes());
    let mut out = Vec::new();
    for (doc, v) in serde_saphyr::read_with_options::<_, Value>(&mut reader, reader_options()).enumerate() {
        // The document's place in the part: its place in the file is known
        // once the parts before it are read (see `place`).
        let origin = Origin::File { path: path.clone(), doc };
        let mut items = Vec::new();
        read_value(&origin, v.ok()?, &mut |item| items.push(item));
        out.push(items);
    }
    Some(out)
}

/// Cuts `text` into up to `parts` parts, each of whole documents: a cut is
/// made only before a document marker (`---` at the start of a line). One
/// part when the text has a directive (`%YAML`, `%TAG`), which belongs to
/// the document after it.
fn document_parts(text: &str, parts: usize) -> Vec<&str> {
    if parts <= 1 || text.starts_with('%') || text.contains("\n%") {
        return vec![text];
    }
    let mut cuts = vec![0];
    for i in 1..parts {
        let from = (text.len() * i / parts).max(cuts[cuts.len() - 1] + 1);
        if let Some(at) = next_marker(text, from) {
            cuts.push(at);
        }
    }
    cuts.dedup();
    cuts.push(text.len());
    cuts.windows(2).map(|w| &text[w[0]..w[1]]).filter(|t| !t.is_empty()).collect()
}

/// Where the first line at or after byte `from` (a line start past it) that
/// is a document marker begins.
fn next_marker(text: &str, from: usize) -> Option<usize> {
    let bytes = text.as_bytes();
    let mut at = from.min(bytes.len());
    while !text.is_char_boundary(at) {
        at += 1;
    }
    while let Some(i) = text.get(at..)?.find("\n---") {
        let line = at + i + 1;
        match bytes.get(line + 3) {
            None | Some(b'\n' | b'\r' | b' ' | b'\t') => return Some(line),
            _ => at = line,
        }
    }
    None
}

/// What one document (or one item of a `List`) holds, before its place in
/// the file is known.
enum Item {
    /// Boxed, as objects are: a typed object takes 2.2 KB inline, a
    /// config 300 bytes, and a part holds its items until they are placed.
    Config(Box<ConfigDoc>),
    Object(Box<Object>),
    /// A kind the agent does not use.
    Ignored(String),
    Problem(Option<String>, DocError),
}

/// Reads a parsed document into items (a `List` gives one per item).
fn read_value(origin: &Origin, v: Value, out: &mut impl FnMut(Item)) {
    if v.is_null() {
        return;
    }
    let Some(list) = v.get("kind").and_then(Value::as_str).map(|k| k == "List") else {
        return out(Item::Problem(None, DocError::NoKind));
    };
    if list {
        // `kubectl get -o yaml` output: items are documents of their own.
        if let Value::Object(mut list) = v
            && let Some(Value::Array(items)) = list.remove("items")
        {
            for item in items {
                out(read_one(origin, item));
            }
        }
        return;
    }
    out(read_one(origin, v));
}

fn read_one(origin: &Origin, v: Value) -> Item {
    let kind = v.get("kind").and_then(Value::as_str).unwrap_or_default().to_owned();
    if CONFIG_KINDS.contains(&kind.as_str()) {
        return Item::Config(Box::new(ConfigDoc::read(origin.clone(), &v)));
    }
    let what = describe(&v);
    match object_from_value(v) {
        Ok(Some(o)) if o.key().name.is_empty() => Item::Problem(what, DocError::NoName),
        Ok(Some(o)) => Item::Object(Box::new(o)),
        Ok(None) => Item::Ignored(kind),
        Err(e) => Item::Problem(what, e),
    }
}

/// Puts what a document held into `into`, as read from `origin`.
fn place(item: Item, origin: &Origin, into: &mut Loaded) {
    match item {
        Item::Config(mut doc) => {
            doc.moved_to(origin);
            into.configs.push_back(Arc::new(*doc));
        }
        Item::Object(o) => into.objects.insert(origin.clone(), *o),
        Item::Ignored(kind) => into.ignored.push((origin.clone(), kind)),
        Item::Problem(what, error) => into.problems.push(ParseProblem::new(origin.clone(), what, error)),
    }
}

/// Reads one file of the objects directory (bounded in size, UTF-8) into `into`.
pub fn load_file(path: &Path, into: &mut Loaded) {
    match limits::read_text(path, limits::MAX_FILE_BYTES) {
        Ok(text) => load_text(path, &text, into),
        Err(e) => into.problems.push(ParseProblem::new(
            Origin::File { path: Arc::from(path), doc: 0 },
            None,
            DocError::Unreadable(e.to_string()),
        )),
    }
}

/// The YAML/JSON files of a directory tree (or the path itself, if a file), sorted.
pub fn files(path: &Path) -> std::io::Result<Vec<PathBuf>> {
    let mut out = Vec::new();
    if path.is_file() {
        out.push(path.to_owned());
        return Ok(out);
    }
    let mut stack = vec![path.to_owned()];
    while let Some(dir) = stack.pop() {
        for entry in fs::read_dir(&dir)? {
            let p = entry?.path();
            let name = p.file_name().and_then(|n| n.to_str()).unwrap_or("");
            if name.starts_with('.') {
                continue; // editors' swap files, ..data symlinks of ConfigMap mounts
            }
            if p.is_dir() {
                stack.push(p);
            } else if matches!(p.extension().and_then(|e| e.to_str()), Some("yaml" | "yml" | "json")) {
                out.push(p);
            }
        }
    }
    out.sort();
    Ok(out)
}

/// Loads every file under `path`.
pub fn load_path(path: &Path) -> std::io::Result<Loaded> {
    let mut loaded = Loaded::default();
    for file in files(path)? {
        load_file(&file, &mut loaded);
    }
    Ok(loaded)
}

impl Loaded {
    /// Copies what `other` held from one document (`origin`); true if anything.
    pub fn carry_over_origin(&mut self, other: &Loaded, origin: &Origin) -> bool {
        let configs: Vec<_> = other.configs.iter().filter(|d| d.origin == *origin).cloned().collect();
        let found = !configs.is_empty();
        self.configs.extend(configs);
        self.objects.carry_over_origin(&other.objects, origin) || found
    }

    /// Adds everything `other` holds.
    pub fn merge(&mut self, other: &Loaded) {
        self.objects.merge(&other.objects);
        self.problems.extend(other.problems.iter().cloned());
        self.ignored.extend(other.ignored.iter().cloned());
        self.configs.extend(other.configs.iter().cloned());
    }
}

/// What a file held when it was last read.
struct CachedFile {
    stamp: (u64, SystemTime),
    loaded: Loaded,
}

type Files = BTreeMap<PathBuf, CachedFile>;

/// A directory of object files, watched by polling. Only files that changed
/// are read again. A file that no longer parses as YAML keeps its previous
/// contents, and a document that no longer parses keeps its object's previous
/// version: bad input is reported and loses nothing that was good.
///
/// What the files hold together (an object in a later file, in path order,
/// wins over one of the same kind and key in an earlier file) is kept from
/// poll to poll and changed by what the changed files changed: a poll after
/// one small file changed costs what that file holds, not what the
/// directory holds, and hands over a world that shares every unchanged part
/// with the last one.
pub struct DirSource {
    root: PathBuf,
    files: Files,
    world: Loaded,
    /// Per kind, the keys more than one file holds (usually none): only
    /// for these does a change look through every file for the winner.
    shadowed: BTreeMap<&'static str, BTreeSet<ObjKey>>,
}

/// A file that changed in a poll: its objects before and after (None: no
/// such file then).
struct ChangedFile<'a> {
    path: &'a Path,
    before: Option<&'a Objects>,
    after: Option<&'a Objects>,
}

/// Brings the world's objects of each kind up to date with the changed
/// files (see [`DirSource`]).
struct Patch<'a> {
    world: &'a mut Objects,
    changed: &'a [ChangedFile<'a>],
    files: &'a Files,
    shadowed: &'a mut BTreeMap<&'static str, BTreeSet<ObjKey>>,
}

/// The files that hold an object of a key, with their version of it.
type Holders<'a, T> = Vec<(&'a Path, &'a Arc<super::Sourced<T>>)>;

/// The file an object was read from.
fn file_of(origin: &Origin) -> Option<&Path> {
    match origin {
        Origin::File { path, .. } => Some(path),
        _ => None,
    }
}

impl EachKind for Patch<'_> {
    fn kind<T>(
        &mut self,
        name: &'static str,
        get: fn(&Objects) -> &Collection<T>,
        get_mut: fn(&mut Objects) -> &mut Collection<T>,
    ) {
        // The keys the changed files changed, each with the changed files
        // that hold it now.
        let none = Collection::new();
        let mut touched: BTreeMap<&ObjKey, Holders<T>> = BTreeMap::new();
        for f in self.changed {
            let (before, after) = (f.before.map_or(&none, get), f.after.map_or(&none, get));
            for d in before.diff(after) {
                match d {
                    DiffItem::Remove(k, _) => {
                        touched.entry(k).or_default();
                    }
                    DiffItem::Add(k, v) | DiffItem::Update { new: (k, v), .. } => {
                        touched.entry(k).or_default().push((f.path, v));
                    }
                }
            }
        }
        if touched.is_empty() {
            return;
        }
        let shadowed = self.shadowed.entry(name).or_default();
        let world = get_mut(self.world);
        for (key, mut holders) in touched {
            if shadowed.contains(key) {
                holders = self
                    .files
                    .iter()
                    .filter_map(|(p, c)| Some((p.as_path(), get(&c.loaded.objects).get(key)?)))
                    .collect();
            } else if let Some(held) = world.get(key).and_then(|held| file_of(&held.origin))
                && let Some((path, file)) = self.files.get_key_value(held)
                && let Some(v) = get(&file.loaded.objects).get(key)
                && !holders.iter().any(|(p, _)| *p == path.as_path())
            {
                // The one file that held it holds it still.
                holders.push((path.as_path(), v));
            }
            match holders.iter().max_by_key(|(p, _)| *p) {
                Some((_, v)) => drop(world.insert(key.clone(), Arc::clone(v))),
                None => drop(world.remove(key)),
            }
            if holders.len() > 1 {
                shadowed.insert(key.clone());
            } else {
                shadowed.remove(key);
            }
        }
    }
}

impl DirSource {
    pub fn new(root: PathBuf) -> Self {
        Self { root, files: Default::default(), world: Loaded::default(), shadowed: BTreeMap::new() }
    }

    /// Reads what changed since the last call; Some(everything) if anything did.
    pub fn poll(&mut self) -> Option<Loaded> {
        let now = fingerprint(&self.root);
        let mut changed = now.len() != self.files.len();
        let mut next = BTreeMap::new();
        let mut read = BTreeSet::new();
        for (path, len, mtime) in now {
            let stamp = (len, mtime);
            if self.files.get(&path).is_some_and(|c| c.stamp == stamp) {
                let c = self.files.remove(&path).expect("present");
                next.insert(path, c);
                continue;
            }
            changed = true;
            let previous = self.files.get(&path).map(|c| &c.loaded);
            let mut fresh = Loaded::default();
            load_file(&path, &mut fresh);
            let mut kept = fresh;
            if let Some(prev) = previous {
                let whole_file_broken = kept.problems.iter().any(|p| p.error.whole_file());
                if whole_file_broken {
                    let mut restored = Loaded { problems: kept.problems.clone(), ..Default::default() };
                    restored.objects = prev.objects.clone();
                    restored.configs = prev.configs.clone();
                    restored.ignored = prev.ignored.clone();
                    for p in restored.problems.iter_mut() {
                        p.keep(Kept::PreviousContents);
                    }
                    kept = restored;
                } else {
                    let mut problems = std::mem::take(&mut kept.problems);
                    for p in problems.iter_mut() {
                        let carried = match &p.object {
                            Some(what) => kept.objects.carry_over(&prev.objects, what),
                            // A document too broken to name: what that document held before.
                            None => kept.carry_over_origin(prev, &p.origin),
                        };
                        if carried {
                            p.keep(Kept::PreviousVersion);
                        }
                    }
                    kept.problems = problems;
                }
            }
            read.insert(path.clone());
            next.insert(path, CachedFile { stamp, loaded: kept });
        }
        // What is left of the files as they were: the ones read again, and
        // the ones removed.
        let before = std::mem::replace(&mut self.files, next);
        if !changed {
            return None;
        }
        self.take_in(&before, &read);
        Some(Loaded {
            objects: self.world.objects.clone(),
            problems: self.files.values().flat_map(|c| c.loaded.problems.iter().cloned()).collect(),
            ignored: self.files.values().flat_map(|c| c.loaded.ignored.iter().cloned()).collect(),
            configs: self.world.configs.clone(),
        })
    }

    /// Brings the world up to date with the files read again (`read`) and
    /// the ones removed; `before` holds what those held.
    fn take_in(&mut self, before: &Files, read: &BTreeSet<PathBuf>) {
        fn held<'a>(files: &'a Files, p: &Path) -> Option<&'a Loaded> {
            files.get(p).map(|c| &c.loaded)
        }
        let paths: BTreeSet<&Path> = read.iter().chain(before.keys()).map(PathBuf::as_path).collect();
        let changed: Vec<ChangedFile> = paths
            .iter()
            .map(|p| ChangedFile {
                path: p,
                before: held(before, p).map(|l| &l.objects),
                after: held(&self.files, p).map(|l| &l.objects),
            })
            .collect();
        Objects::each_kind(&mut Patch {
            world: &mut self.world.objects,
            changed: &changed,
            files: &self.files,
            shadowed: &mut self.shadowed,
        });
        // The documents, in path order: each changed file's are replaced
        // where they stand, the last file first so that the places of
        // the earlier ones stay as they were.
        let unchanged = self.files.iter().filter(|(p, _)| !read.contains(*p));
        let was: BTreeMap<&Path, usize> =
            unchanged.chain(before).map(|(p, c)| (p.as_path(), c.loaded.configs.len())).collect();
        let mut at = 0;
        let mut starts = BTreeMap::new();
        for (p, n) in was {
            starts.insert(p, at);
            at += n;
        }
        for p in paths.iter().rev() {
            let empty = imbl::Vector::new();
            let old = held(before, p).map_or(&empty, |l| &l.configs);
            let new = held(&self.files, p).map_or(&empty, |l| &l.configs);
            if old.len() == new.len() && old.iter().zip(new).all(|(a, b)| Arc::ptr_eq(a, b)) {
                continue;
            }
            // A new file's documents go before those of the first file after it.
            let start = starts
                .get(p)
                .copied()
                .or_else(|| {
                    starts
                        .range::<Path, _>((std::ops::Bound::Excluded(*p), std::ops::Bound::Unbounded))
                        .next()
                        .map(|(_, at)| *at)
                })
                .unwrap_or(at);
            let configs = &mut self.world.configs;
            let mut rest = configs.split_off(start);
            let rest = rest.split_off(old.len());
            configs.extend(new.iter().cloned());
            configs.append(rest);
        }
    }
}

/// Names, sizes and modification times of the files under `path`: changes
/// when any file is added, removed or edited.
pub fn fingerprint(path: &Path) -> Vec<(PathBuf, u64, SystemTime)> {
    files(path)
        .unwrap_or_default()
        .into_iter()
        .filter_map(|p| {
            let m = fs::metadata(&p).ok()?;
            Some((p, m.len(), m.modified().ok()?))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn good_documents_survive_a_bad_one() {
        let text = r#"
apiVersion: v1
kind: Service
metadata: {name: web, namespace: shop}
spec:
  clusterIP: 10.96.0.20
  ports: [{port: 80, targetPort: 8080}]
---
apiVersion: v1
kind: Service
metadata: {name: broken}
spec:
  ports: "not a list"
---
apiVersion: apps/v1
kind: Deployment
metadata: {name: web}
"#;
        let mut l = Loaded::default();
        load_text(Path::new("objs/web.yaml"), text, &mut l);
        assert_eq!(l.objects.services.len(), 1);
        let svc = &l.objects.services[&crate::k8s::ObjKey::new("shop", "web")];
        assert_eq!(svc.origin, Origin::File { path: Path::new("objs/web.yaml").into(), doc: 0 });
        assert_eq!(l.problems.len(), 1);
        let p = l.problems[0].to_string();
        assert!(p.starts_with("objs/web.yaml (document 2): Service broken:"), "{p}");
        assert_eq!(
            l.ignored,
            vec![(Origin::File { path: Path::new("objs/web.yaml").into(), doc: 2 }, "Deployment".into())]
        );
    }

    #[test]
    fn a_broken_file_or_document_keeps_what_was_good() {
        let dir = std::env::temp_dir().join(format!("weft-dirsource-{}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        fs::create_dir_all(&dir).unwrap();
        let f = dir.join("a.yaml");
        let svc = |ports: &str| {
            format!(
                "apiVersion: v1\nkind: Service\nmetadata: {{name: web, namespace: shop}}\nspec: {{ports: {ports}}}\n"
            )
        };
        fs::write(&f, svc("[{port: 80}]")).unwrap();
        let mut src = DirSource::new(dir.clone());
        assert_eq!(src.poll().unwrap().objects.services.len(), 1);
        assert!(src.poll().is_none(), "nothing changed");

        // A document that stops parsing keeps its object's previous version.
        fs::write(&f, svc("\"not a list\"") + "\n").unwrap();
        let l = src.poll().unwrap();
        assert_eq!(l.objects.services.len(), 1);
        assert!(l.problems[0].message.ends_with("(its previous version stays in effect)"), "{}", l.problems[0]);
        assert_eq!(l.problems[0].kept, Some(Kept::PreviousVersion));

        // A file that stops being YAML keeps its previous contents.
        fs::write(&f, svc("[{port: 80}]")).unwrap();
        src.poll().unwrap();
        fs::write(&f, "kind: [\n").unwrap();
        let l = src.poll().unwrap();
        assert_eq!(l.objects.services.len(), 1);
        assert!(l.problems[0].message.ends_with("(its previous contents stay in effect)"), "{}", l.problems[0]);
        assert!(l.problems[0].error.whole_file());

        // Removing the file removes its objects.
        fs::remove_file(&f).unwrap();
        assert_eq!(src.poll().unwrap().objects.services.len(), 0);
        fs::remove_dir_all(&dir).unwrap();
    }

    /// What the directory's files hold merged anew, as a poll made it before
    /// the world was kept: Services (key, origin, address) and documents
    /// (origin, name), in order.
    fn merged_anew(dir: &Path) -> Seen {
        let l = load_path(dir).unwrap();
        seen(&l)
    }

    /// Services (key, origin, address) and documents (origin, name), in order.
    type Seen = (Vec<(ObjKey, Origin, Option<String>)>, Vec<(Origin, Option<String>)>);

    fn seen(l: &Loaded) -> Seen {
        let services = l
            .objects
            .services
            .iter()
            .map(|(k, v)| (k.clone(), v.origin.clone(), v.object.spec.as_ref().and_then(|s| s.cluster_ip.clone())))
            .collect();
        (services, l.configs.iter().map(|d| (d.origin.clone(), d.name.clone())).collect())
    }

    /// The world a poll hands over, kept and changed by what changed, is
    /// what merging every file anew gives (a later file's object wins over
    /// an earlier one's), after every step of random writes and removals of
    /// files holding the same keys; and what a step did not change stays
    /// the same `Arc`.
    #[test]
    fn the_kept_world_equals_every_file_merged_anew_after_every_random_step() {
        let dir = std::env::temp_dir().join(format!("weft-dirsource-world-{}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        fs::create_dir_all(dir.join("sub")).unwrap();
        let files = ["a.yaml", "b.yaml", "sub/c.yaml", "z.yaml"];
        let mut rng = crate::xds::acks::tests::Rng(0x5eed_f11e);
        let mut src = DirSource::new(dir.clone());
        let mut last: Option<Loaded> = None;
        for step in 0..300u64 {
            let file = dir.join(files[rng.below(files.len() as u64) as usize]);
            if rng.below(5) == 0 {
                let _ = fs::remove_file(&file);
            } else {
                let mut text = String::new();
                for s in 0..4 {
                    if rng.below(2) == 0 {
                        text.push_str(&format!(
                            "---\napiVersion: v1\nkind: Service\nmetadata: {{name: s{s}, namespace: default}}\nspec: {{clusterIP: 10.96.{step}.{s}}}\n"
                        ));
                    }
                    if rng.below(3) == 0 {
                        text.push_str(&format!(
                            "---\napiVersion: weft.io/v1alpha1\nkind: EnvoyConfig\nmetadata: {{name: c{s}, namespace: default}}\nspec: {{resources: []}}\n"
                        ));
                    }
                }
                fs::write(&file, text).unwrap();
                // A stamp of its own, however fast the steps come.
                let when = SystemTime::UNIX_EPOCH + std::time::Duration::from_secs(1_000_000 + step);
                fs::File::options().write(true).open(&file).unwrap().set_modified(when).unwrap();
            }
            let Some(l) = src.poll() else { continue };
            assert_eq!(seen(&l), merged_anew(&dir), "step {step}");
            if let Some(prev) = &last {
                let changed = |o: &Origin| matches!(o, Origin::File { path, .. } if **path == *file);
                for (k, v) in &l.objects.services {
                    if let Some(p) = prev.objects.services.get(k).filter(|p| !changed(&p.origin) && !changed(&v.origin))
                    {
                        assert!(Arc::ptr_eq(p, v), "step {step}: {k} changed though its file did not");
                    }
                }
            }
            last = Some(l);
        }
        fs::remove_dir_all(&dir).unwrap();
    }

    /// Reading a text in parts gives what reading it whole gives (every
    /// object, config, ignored document and problem, with its document's
    /// index), for random files of documents that are fine, broken in a
    /// document, broken for the file, empty, lists, block scalars cut by a
    /// marker, markers with content, ends of documents and directives.
    #[test]
    fn a_text_read_in_parts_is_read_as_whole() {
        const DOCS: &[&str] = &[
            "apiVersion: v1\nkind: Service\nmetadata: {name: s@, namespace: default}\nspec: {clusterIP: 10.96.0.@}\n",
            "apiVersion: weft.io/v1alpha1\nkind: EnvoyConfig\nmetadata: {name: c@, namespace: default}\nspec: {resources: []}\n",
            "apiVersion: weft.io/v1alpha1\nkind: EnvoyConfig\nmetadata: {name: C@}\nspec: {resources: []}\n",
            "apiVersion: apps/v1\nkind: Deployment\nmetadata: {name: d@}\n",
            "metadata: {name: nokind@}\n",
            "apiVersion: v1\nkind: Service\nmetadata: {namespace: default}\n",
            "apiVersion: v1\nkind: List\nitems:\n- {apiVersion: v1, kind: Service, metadata: {name: l@}}\n- {apiVersion: v1, kind: ConfigMap, metadata: {name: m@}}\n",
            "# only a comment\n",
            "",
            "apiVersion: v1\nkind: ConfigMap\nmetadata: {name: b@}\ndata:\n  x: |\n    one\n",
            "  two @\n",
            "apiVersion: v1\nkind: Service\nmetadata: {name: e@}\n...\n",
            "apiVersion: v1\nkind: Service\nmetadata: {name: dup@, name: again}\n",
            "apiVersion: v1\nkind: Service\nmetadata: {name: [\n",
            "apiVersion: v1\nkind: Service\nspec: {ports: \"not a list\"}\nmetadata: {name: bad@}\n",
            "%YAML 1.2\n",
            "apiVersion: v1\nkind: Service\nmetadata: {name: ü@}\n",
        ];
        let mut rng = crate::xds::acks::tests::Rng(0x9a27_5e11);
        let (mut cut, mut rounds) = (0, 0);
        for round in 0..400 {
            let mut text = String::new();
            let broken = rng.below(4) == 0;
            for i in 0..(2 + rng.below(12)) {
                let pick = DOCS.len() - if broken { 0 } else { 4 };
                let doc = DOCS[(rng.below(pick as u64)) as usize].replace('@', &format!("{round}x{i}"));
                let marker = ["---\n", "--- ", "---\r\n", "--- # a comment\n"][rng.below(4) as usize];
                if i > 0 || rng.below(2) == 0 {
                    text.push_str(marker);
                }
                text.push_str(&doc);
            }
            let whole = {
                let mut l = Loaded::default();
                load_text_in_parts(Path::new("f.yaml"), &text, 1, &mut l);
                format!("{l:?}")
            };
            for parts in 2..=5 {
                cut += usize::from(document_parts(&text, parts).len() > 1);
                rounds += 1;
                let mut l = Loaded::default();
                load_text_in_parts(Path::new("f.yaml"), &text, parts, &mut l);
                assert_eq!(format!("{l:?}"), whole, "round {round}, {parts} parts of:\n{text}");
            }
        }
        // Most texts were really cut.
        assert!(cut * 2 > rounds, "{cut} of {rounds}");
    }

    /// A part read on a thread of its own may hold a document nested as
    /// deep as the parser allows (its thread has the agent's stack; with a
    /// library's default 2 MiB, 100 levels aborted the process).
    #[test]
    fn a_part_may_hold_the_deepest_document() {
        let deep = format!(
            "apiVersion: v1\nkind: ConfigMap\nmetadata: {{name: deep}}\nextra: {}{}\n",
            "[".repeat(limits::MAX_YAML_DEPTH - 4),
            "]".repeat(limits::MAX_YAML_DEPTH - 4)
        );
        let first = format!("apiVersion: v1\nkind: ConfigMap\nmetadata: {{name: first}}\n# {}\n", "x".repeat(4000));
        let text = format!("{first}---\n{deep}");
        assert_eq!(document_parts(&text, 2).len(), 2);
        // The caller has the agent's stack too (the control loop's runtime worker).
        let read = limits::thread("test-caller")
            .spawn(move || {
                let mut out = [1, 2].map(|_| Loaded::default());
                for (parts, l) in [1, 2].into_iter().zip(out.iter_mut()) {
                    load_text_in_parts(Path::new("d.yaml"), &text, parts, l);
                }
                out.map(|l| format!("{l:?}"))
            })
            .unwrap()
            .join()
            .unwrap();
        assert_eq!(read[0], read[1]);
        // Both documents were read (ConfigMaps are kinds the agent ignores), none refused.
        assert!(read[0].contains("problems: []") && read[0].matches("ConfigMap").count() == 2, "{}", read[0]);
    }

    #[test]
    fn parts_are_cut_at_markers_only() {
        let text = "a: 1\n---\nb: 2\n----\n--- c: 3\n---x\n--- \nd: 4\n";
        for parts in 2..=8 {
            let cut = document_parts(text, parts);
            assert_eq!(cut.concat(), text);
            for p in &cut[1..] {
                assert!(p.starts_with("--- ") || p.starts_with("---\n"), "{cut:?}");
            }
        }
        assert_eq!(document_parts("%YAML 1.2\n---\na: 1\n---\nb: 2\n", 2).len(), 1);
        assert_eq!(document_parts("a: 1\n---\nb: 2\n", 1).len(), 1);
    }

    #[test]
    fn invalid_yaml_names_the_file() {
        let mut l = Loaded::default();
        load_text(Path::new("x.yaml"), "a: [\n", &mut l);
        assert!(l.problems[0].to_string().starts_with("x.yaml: not valid YAML"), "{}", l.problems[0]);
    }
}
