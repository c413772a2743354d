//! The access-log spool: Envoy appends each HTTP exchange as a line
//! ([`super::accesslog`]) to `current.log` in a directory on the node's
//! tmpfs, and the agent reads the lines from a position it persists. Lines
//! Envoy writes while the agent is away wait in the file and are read when
//! it returns; a restarted agent resumes where the last one stopped.
//!
//! The directory holds, in reading order:
//!
//! - `<n>.sealed`: an earlier `current.log` no process writes any more;
//! - `<n>.filling`: one moved aside that an Envoy may still append to (it
//!   has not reopened the path yet, or it is draining);
//! - `current.log`: the file Envoy appends to.
//!
//! The Envoy supervisor moves `current.log` aside ([`SpoolDir::rotate`]) so
//! the spool stays small, and seals a segment once no Envoy writes it
//! ([`SpoolDir::seal`]). The [`SpoolReader`] reads files in order, moves
//! from a segment to the next file only once the segment is sealed and
//! read to its end, and then removes it. Its position (the file's inode and
//! an offset) lives in `position`, written in one `pwrite`; it only moves
//! past lines the caller has committed (once the pipeline has stored them),
//! so an agent killed in between reads them again rather than losing them.
//!
//! The reader also counts the lines of each Envoy process (each line names
//! its writer, [`accesslog::WRITER_ENV`]) and publishes, whenever it has
//! read everything there is, what it committed ([`Progress`]): the Envoy
//! supervisor compares that with the requests each Envoy served, and counts
//! the difference as lost entries Envoy could not write (a spool at its
//! size limit, the unflushed buffer of a killed Envoy).

use std::{
    fs::{self, File},
    io::{self, Read as _, Seek, SeekFrom},
    os::unix::fs::{FileExt, MetadataExt},
    path::{Path, PathBuf},
    sync::{Arc, atomic::Ordering},
    thread::{self, JoinHandle},
    time::{Duration, Instant},
};

use super::{
    Pipeline,
    accesslog::{self, LineError},
    record::{L7Entry, LostSource},
};

/// The file Envoy appends to.
pub const CURRENT: &str = "current.log";
const POSITION: &str = "position";
const FILLING: &str = "filling";
const SEALED: &str = "sealed";
/// Longer lines are skipped and counted lost.
pub const MAX_LINE: usize = 1 << 20;
const CHUNK: usize = 256 << 10;

/// One file of the spool.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SpoolFile {
    pub path: PathBuf,
    pub inode: u64,
    pub len: u64,
    /// The segment number; `None` for `current.log`.
    pub segment: Option<u64>,
    /// No process writes it any more (segments only).
    pub sealed: bool,
}

/// The spool directory and the names in it.
#[derive(Clone, Debug)]
pub struct SpoolDir {
    dir: PathBuf,
}

fn segment_name(n: u64, state: &str) -> String {
    format!("{n:020}.{state}")
}

impl SpoolDir {
    /// The spool in `dir` (created if missing, readable by its owner only:
    /// the lines carry request paths and headers).
    pub fn create(dir: &Path) -> io::Result<SpoolDir> {
        use std::os::unix::fs::DirBuilderExt;
        fs::DirBuilder::new().recursive(true).mode(0o700).create(dir)?;
        Ok(SpoolDir { dir: dir.to_owned() })
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The path Envoy writes to.
    pub fn current(&self) -> PathBuf {
        self.dir.join(CURRENT)
    }

    /// The spool's files in reading order: segments by number, then
    /// `current.log` when it exists.
    pub fn files(&self) -> io::Result<Vec<SpoolFile>> {
        let mut out = Vec::new();
        let mut current = None;
        for e in fs::read_dir(&self.dir)? {
            let e = e?;
            let name = e.file_name();
            let Some(name) = name.to_str() else { continue };
            let (segment, sealed) = if name == CURRENT {
                (None, false)
            } else {
                let Some((n, state)) = name.split_once('.') else { continue };
                let Ok(n) = n.parse::<u64>() else { continue };
                match state {
                    FILLING => (Some(n), false),
                    SEALED => (Some(n), true),
                    _ => continue,
                }
            };
            // A file removed since the listing is simply not there.
            let Ok(meta) = e.metadata() else { continue };
            let f = SpoolFile { path: e.path(), inode: meta.ino(), len: meta.len(), segment, sealed };
            if segment.is_none() { current = Some(f) } else { out.push(f) }
        }
        out.sort_by_key(|f| f.segment);
        out.extend(current);
        Ok(out)
    }

    /// Moves `current.log` aside as the next segment: sealed when no
    /// process writes it any more, else filling until [`SpoolDir::seal`].
    /// Returns the segment's number, or `None` when there was no
    /// `current.log` (or it was empty, which is simply removed).
    pub fn rotate(&self, sealed: bool) -> io::Result<Option<u64>> {
        let files = self.files()?;
        let Some(cur) = files.iter().find(|f| f.segment.is_none()) else { return Ok(None) };
        if cur.len == 0 && sealed {
            fs::remove_file(&cur.path)?;
            return Ok(None);
        }
        let n = files.iter().filter_map(|f| f.segment).max().map_or(1, |m| m.saturating_add(1));
        fs::rename(&cur.path, self.dir.join(segment_name(n, if sealed { SEALED } else { FILLING })))?;
        Ok(Some(n))
    }

    /// Seals the filling segments numbered up to `upto` (every one with
    /// `None`): no process writes them any more. Returns how many it sealed.
    pub fn seal(&self, upto: Option<u64>) -> io::Result<usize> {
        let mut n = 0;
        for f in self.files()? {
            if let Some(s) = f.segment
                && !f.sealed
                && upto.is_none_or(|u| s <= u)
            {
                fs::rename(&f.path, self.dir.join(segment_name(s, SEALED)))?;
                n += 1;
            }
        }
        Ok(n)
    }

    /// Bytes in the spool (read or not).
    pub fn usage(&self) -> io::Result<u64> {
        Ok(self.files()?.iter().map(|f| f.len).sum())
    }
}

/// Lines committed of one Envoy process (its id, [`accesslog::WRITER_ENV`];
/// 0 for lines that name none).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct WriterLines {
    pub writer: u64,
    pub lines: u64,
}

/// The lines of the last two Envoys the reader met. Envoys write the spool
/// one after another (one is stopped before the next starts), so lines of
/// one Envoy follow each other: a line that names another Envoy starts its
/// count. A line that names none (not an entry, or cut short) is counted
/// for the Envoy whose lines come before it.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Writers {
    pub current: WriterLines,
    pub previous: WriterLines,
}

impl Writers {
    fn line(&mut self, writer: Option<u64>) {
        match writer {
            Some(w) if w != self.current.writer => {
                self.previous = self.current;
                self.current = WriterLines { writer: w, lines: 1 };
            }
            _ => self.current.lines = self.current.lines.saturating_add(1),
        }
    }
}

/// What the reader had committed at a moment it had read every complete
/// line in the spool.
#[derive(Clone, Copy, Debug)]
pub struct Progress {
    /// When it looked: every byte written to the spool before this was read.
    pub at: Instant,
    pub writers: Writers,
    /// A line not finished yet waits at the end (it will be one more line).
    pub partial: bool,
}

/// The reader's persisted place: a file (by inode) and an offset in it,
/// how many lines readers of this spool have committed in all, and those
/// of the last two Envoys.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
struct Position {
    inode: u64,
    offset: u64,
    lines: u64,
    writers: Writers,
}

const POSITION_LEN: usize = 7 * 21;

impl Position {
    fn encode(self) -> [u8; POSITION_LEN] {
        let mut b = [0u8; POSITION_LEN];
        let w = self.writers;
        let s = format!(
            "{:020} {:020} {:020} {:020} {:020} {:020} {:020}\n",
            self.inode, self.offset, self.lines, w.current.writer, w.current.lines, w.previous.writer, w.previous.lines
        );
        b.copy_from_slice(s.as_bytes());
        b
    }

    /// Seven numbers, or the first three (a position written before lines
    /// were counted per Envoy).
    fn decode(b: &[u8]) -> Option<Position> {
        let s = std::str::from_utf8(b).ok()?;
        let f: Vec<u64> = s.split_whitespace().map(|n| n.parse::<u64>()).collect::<Result<_, _>>().ok()?;
        let writers = match f[..] {
            [_, _, _] => Writers::default(),
            [_, _, _, cw, cl, pw, pl] => Writers {
                current: WriterLines { writer: cw, lines: cl },
                previous: WriterLines { writer: pw, lines: pl },
            },
            _ => return None,
        };
        Some(Position { inode: f[0], offset: f[1], lines: f[2], writers })
    }
}

struct Open {
    file: File,
    inode: u64,
    /// Offset of the first byte not handed out yet.
    consumed: u64,
    /// Lines handed out in all (the committed count plus those since).
    lines: u64,
    /// Lines handed out per Envoy.
    writers: Writers,
}

/// What one [`SpoolReader::read`] found.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Read {
    /// Lines handed to the caller (entries and errors).
    pub lines: usize,
    /// Of those, lines that were not entries.
    pub bad: usize,
}

/// A place in the spool: the end of the lines handed out at some moment.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Mark(Position);

/// Reads the spool's lines in order from the persisted position.
pub struct SpoolReader {
    dir: SpoolDir,
    position_file: File,
    committed: Position,
    open: Option<Open>,
    /// Bytes read past `consumed` (a partial line, or lines not yet handed out).
    buf: Vec<u8>,
    /// Inside a line longer than [`MAX_LINE`]: dropping bytes to its end.
    skipping: bool,
    chunk: Vec<u8>,
}

impl SpoolReader {
    /// A reader that resumes where the last one committed.
    pub fn open(dir: SpoolDir) -> io::Result<SpoolReader> {
        let path = dir.dir().join(POSITION);
        let position_file = fs::OpenOptions::new().read(true).write(true).create(true).truncate(false).open(&path)?;
        let mut b = [0u8; POSITION_LEN];
        let n = position_file.read_at(&mut b, 0)?;
        let committed = Position::decode(&b[..n]).unwrap_or_default();
        Ok(SpoolReader {
            dir,
            position_file,
            committed,
            open: None,
            buf: Vec::new(),
            skipping: false,
            chunk: vec![0; CHUNK],
        })
    }

    /// Hands up to `max` complete lines to `f`, in order. Returns what it
    /// handed out; 0 when nothing new is there yet (or earlier lines wait
    /// for [`SpoolReader::commit`] before the reader moves to the next file).
    pub fn read(&mut self, max: usize, mut f: impl FnMut(Result<L7Entry, LineError>)) -> io::Result<Read> {
        let mut out = Read::default();
        while out.lines < max {
            if self.open.is_none() && !self.open_next()? {
                break;
            }
            if self.take_lines(max, &mut out, &mut f) {
                continue;
            }
            // The seal is checked before the last read: a segment sealed
            // after that read may have grown in between.
            let sealed = self.sealed()?;
            let Some(open) = self.open.as_mut() else { break };
            let n = open.file.read(&mut self.chunk)?;
            if n > 0 {
                self.push(n);
                continue;
            }
            if !sealed {
                break;
            }
            // The end of a sealed segment: it is complete. Move on once
            // everything handed out is committed.
            if open.consumed != self.committed.offset || open.inode != self.committed.inode {
                break;
            }
            let open_lines = open.lines;
            if !self.buf.is_empty() || self.skipping {
                // A line cut short (Envoy stopped mid-write): lost.
                let cut = self.buf.len() as u64;
                self.buf.clear();
                self.skipping = false;
                out.lines += 1;
                out.bad += 1;
                f(Err(LineError::Json("a line cut short at the end of a segment".into())));
                if let Some(o) = self.open.as_mut() {
                    o.consumed += cut;
                    o.lines = open_lines + 1;
                    o.writers.line(None);
                }
                break;
            }
            if !self.advance()? {
                break;
            }
        }
        Ok(out)
    }

    /// Persists the position after the last line handed out.
    pub fn commit(&mut self) -> io::Result<()> {
        match self.handed_out() {
            Some(m) => self.commit_to(m),
            None => Ok(()),
        }
    }

    /// Where the lines handed out so far end, to commit later
    /// ([`SpoolReader::commit_to`]); `None` before a file is open.
    pub fn handed_out(&self) -> Option<Mark> {
        let o = self.open.as_ref()?;
        Some(Mark(Position { inode: o.inode, offset: o.consumed, lines: o.lines, writers: o.writers }))
    }

    /// Persists a position taken earlier by [`SpoolReader::handed_out`]
    /// (lines after it are read again by the next reader). Marks are
    /// committed in the order they were taken; the reader does not leave
    /// a segment until its end is committed, so a mark's file is still
    /// the one open.
    pub fn commit_to(&mut self, m: Mark) -> io::Result<()> {
        if m.0 != self.committed {
            self.position_file.write_all_at(&m.0.encode(), 0)?;
            self.committed = m.0;
        }
        Ok(())
    }

    /// Whether everything handed out is committed.
    pub fn all_committed(&self) -> bool {
        self.handed_out().is_none_or(|m| m.0 == self.committed)
    }

    /// Lines committed by every reader of this spool so far (it counts
    /// across agent restarts).
    pub fn committed_lines(&self) -> u64 {
        self.committed.lines
    }

    /// Lines committed per Envoy (across agent restarts too).
    pub fn writers(&self) -> Writers {
        self.committed.writers
    }

    /// Whether a line not finished yet waits after the last one handed out.
    pub fn partial(&self) -> bool {
        !self.buf.is_empty() || self.skipping
    }

    /// Whether every complete line in the spool has been handed out (what
    /// is left is at most a partial line).
    pub fn caught_up(&self) -> io::Result<bool> {
        Ok(self.backlog()? <= self.buf.len() as u64)
    }

    /// Bytes in the spool the reader has not handed out yet.
    pub fn backlog(&self) -> io::Result<u64> {
        let files = self.dir.files()?;
        let (inode, consumed) =
            self.open.as_ref().map_or((self.committed.inode, self.committed.offset), |o| (o.inode, o.consumed));
        let at = files.iter().position(|f| f.inode == inode).unwrap_or(0);
        let skip = if files.get(at).is_some_and(|f| f.inode == inode) { consumed } else { 0 };
        Ok(files[at..].iter().map(|f| f.len).sum::<u64>().saturating_sub(skip))
    }

    /// Complete lines in `buf`, up to `max` in all; true if it handed any out.
    fn take_lines(&mut self, max: usize, out: &mut Read, f: &mut impl FnMut(Result<L7Entry, LineError>)) -> bool {
        let Some(open) = self.open.as_mut() else { return false };
        let mut start = 0;
        let before = out.lines;
        while out.lines < max {
            let Some(nl) = self.buf[start..].iter().position(|b| *b == b'\n') else { break };
            let line = &self.buf[start..start + nl];
            start += nl + 1;
            out.lines += 1;
            open.lines += 1;
            if self.skipping {
                self.skipping = false;
                out.bad += 1;
                open.writers.line(None);
                f(Err(LineError::TooLong(MAX_LINE)));
                continue;
            }
            match accesslog::parse_entry(line) {
                Ok((entry, writer)) => {
                    open.writers.line(writer);
                    f(Ok(entry));
                }
                Err(e) => {
                    out.bad += 1;
                    open.writers.line(None);
                    f(Err(e));
                }
            }
        }
        open.consumed += start as u64;
        self.buf.drain(..start);
        out.lines > before
    }

    /// Adds the first `n` bytes of `chunk`; a partial line longer than
    /// [`MAX_LINE`] is dropped up to its end (counted when the end comes).
    fn push(&mut self, n: usize) {
        self.buf.extend_from_slice(&self.chunk[..n]);
        if self.buf.len() > MAX_LINE && !self.buf.contains(&b'\n') {
            let Some(open) = self.open.as_mut() else { return };
            open.consumed += self.buf.len() as u64;
            self.buf.clear();
            self.skipping = true;
        }
    }

    fn sealed(&self) -> io::Result<bool> {
        let Some(o) = &self.open else { return Ok(false) };
        Ok(self.dir.files()?.iter().any(|f| f.inode == o.inode && f.sealed))
    }

    /// Opens the file at the committed position, or the first one; removes
    /// segments before it (read to their end earlier). False if there is
    /// no file yet.
    fn open_next(&mut self) -> io::Result<bool> {
        let files = self.dir.files()?;
        let at = files.iter().position(|f| f.inode == self.committed.inode);
        let (idx, offset) = match at {
            Some(i) => (i, self.committed.offset.min(files[i].len)),
            None => (0, 0),
        };
        for f in &files[..idx] {
            if f.sealed {
                fs::remove_file(&f.path)?;
            }
        }
        let Some(target) = files.get(idx) else { return Ok(false) };
        let mut file = File::open(&target.path)?;
        file.seek(SeekFrom::Start(offset))?;
        self.open = Some(Open {
            file,
            inode: target.inode,
            consumed: offset,
            lines: self.committed.lines,
            writers: self.committed.writers,
        });
        self.buf.clear();
        self.skipping = false;
        if at.is_none() || offset != self.committed.offset {
            self.commit()?;
        }
        Ok(true)
    }

    /// Moves from a finished segment to the next file, if there is one:
    /// the position goes there first, then the segment is removed.
    fn advance(&mut self) -> io::Result<bool> {
        let Some(o) = &self.open else { return Ok(false) };
        let files = self.dir.files()?;
        let Some(i) = files.iter().position(|f| f.inode == o.inode) else { return Ok(false) };
        let Some(next) = files.get(i + 1) else { return Ok(false) };
        let p = Position { inode: next.inode, offset: 0, ..self.committed };
        self.position_file.write_all_at(&p.encode(), 0)?;
        self.committed = p;
        fs::remove_file(&files[i].path)?;
        self.open = None;
        Ok(true)
    }
}

/// How often the reader looks for new lines (Envoy writes its buffer
/// every 100 ms by default: `--file-flush-interval-msec` in the agent's
/// command line, `envoy.access-log-flush-ms`).
const POLL: Duration = Duration::from_millis(50);
/// Lines handed to the pipeline before they are committed: well under its
/// access-log queue, which the reader is the only producer for.
const BATCH: usize = 1024;
/// How long the reader waits for the ring-buffer reader's first hand-over.
const RING_WAIT: Duration = Duration::from_secs(2);
/// How long lines stay uncommitted after the pipeline stored their flows:
/// long enough for followers that keep up to have been sent them (they
/// gather for 10 ms, then write). An agent killed in that time leaves the
/// lines to the next one, which reads them again; `weft observe` prints a
/// flow it had printed once. Committed at once, a line whose flow was in
/// the store but not yet on a follower's connection would be lost to it.
pub const COMMIT_LAG: Duration = Duration::from_secs(1);

/// Reads the spool into the pipeline until it stops: a batch of lines is
/// queued, and committed [`COMMIT_LAG`] after the pipeline has stored it.
/// Lines that are not entries are counted lost (source `proxy`).
pub fn spawn_reader(pipeline: Arc<Pipeline>, mut reader: SpoolReader) -> io::Result<JoinHandle<()>> {
    let stack = pipeline.thread_stack_bytes;
    thread::Builder::new().name("access-log".into()).stack_size(stack).spawn(move || {
        // Entries are joined to the connections of the ring buffer's
        // records: after a restart, let the ring's backlog go first.
        let t0 = Instant::now();
        while !pipeline.ring_drained() && t0.elapsed() < RING_WAIT && !pipeline.stopped() {
            thread::sleep(Duration::from_millis(10));
        }
        let mut stored_target = pipeline.l7_stored();
        pipeline.counters.spool_committed.store(reader.committed_lines(), Ordering::Relaxed);
        let mut last_error: Option<Instant> = None;
        // Stored batches not committed yet, oldest first.
        let mut stored: std::collections::VecDeque<(Instant, Mark)> = Default::default();
        while !pipeline.stopped() {
            let due = stored.iter().take_while(|(at, _)| at.elapsed() >= COMMIT_LAG).count();
            if let Some((_, m)) = stored.drain(..due).next_back() {
                match reader.commit_to(m) {
                    Ok(()) => pipeline.counters.spool_committed.store(reader.committed_lines(), Ordering::Relaxed),
                    Err(e) => tracing::error!("saving the access-log spool position: {e}"),
                }
            }
            let mut bad_shown = 0;
            let r = reader.read(BATCH, |e| match e {
                Ok(entry) => {
                    if pipeline.submit_l7(entry) {
                        stored_target += 1;
                    }
                }
                Err(e) => {
                    if bad_shown < 3 {
                        tracing::warn!("access-log spool: {e}");
                        bad_shown += 1;
                    }
                }
            });
            let read = match r {
                Ok(read) => read,
                Err(e) => {
                    if last_error.is_none_or(|t| t.elapsed() > Duration::from_secs(60)) {
                        tracing::error!("reading the access-log spool: {e}");
                        last_error = Some(Instant::now());
                    }
                    thread::sleep(Duration::from_secs(1));
                    continue;
                }
            };
            pipeline.lose(LostSource::Proxy, read.bad as u64);
            if read.lines == 0 {
                // Once everything handed out is committed and nothing else
                // is there, say how far the reader got.
                let at = Instant::now();
                if reader.all_committed() && reader.caught_up().unwrap_or(false) {
                    let p = Progress { at, writers: reader.writers(), partial: reader.partial() };
                    *pipeline.spool_progress.lock().unwrap_or_else(|e| e.into_inner()) = Some(p);
                }
                thread::sleep(POLL);
                continue;
            }
            while pipeline.l7_stored() < stored_target && !pipeline.stopped() {
                thread::sleep(Duration::from_millis(1));
            }
            if let Some(m) = reader.handed_out() {
                stored.push_back((Instant::now(), m));
            }
        }
    })
}

#[cfg(test)]
mod tests {
    use std::io::Write;

    use super::*;

    fn line(code: u32) -> String {
        format!("{{\"code\":{code},\"method\":\"GET\",\"path\":\"/{code}\"}}\n")
    }

    fn append(path: &Path, s: &str) {
        fs::OpenOptions::new().create(true).append(true).open(path).unwrap().write_all(s.as_bytes()).unwrap();
    }

    fn codes(r: &mut SpoolReader) -> (Vec<u32>, usize) {
        let mut got = Vec::new();
        let read = r.read(1000, |e| got.push(e.map(|e| e.http.code).unwrap_or(0))).unwrap();
        r.commit().unwrap();
        (got, read.bad)
    }

    fn tmp(name: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("weft-spool-{name}-{}", std::process::id()));
        let _ = fs::remove_dir_all(&d);
        d
    }

    #[test]
    fn lines_are_read_once_across_readers_rotations_and_partial_writes() {
        let d = tmp("order");
        let spool = SpoolDir::create(&d).unwrap();
        let cur = spool.current();
        let mut r = SpoolReader::open(spool.clone()).unwrap();
        assert_eq!(codes(&mut r), (vec![], 0), "nothing yet");
        append(&cur, &line(1));
        append(&cur, &line(2)[..10]); // half a line: not handed out yet
        assert_eq!(codes(&mut r), (vec![1], 0));
        append(&cur, &line(2)[10..]);
        assert_eq!(codes(&mut r), (vec![2], 0));
        append(&cur, &line(3));
        drop(r); // the agent goes away: line 3 waits...
        let mut r = SpoolReader::open(spool.clone()).unwrap();
        assert_eq!(codes(&mut r), (vec![3], 0), "...and a new reader resumes");

        // Rotation while a writer still appends to the moved file.
        let mut old = fs::OpenOptions::new().append(true).open(&cur).unwrap();
        let n = spool.rotate(false).unwrap().unwrap();
        old.write_all(line(4).as_bytes()).unwrap();
        append(&cur, &line(6)); // the writer reopened: the new current.log
        assert_eq!(codes(&mut r), (vec![4], 0), "the filling segment first");
        old.write_all(line(5).as_bytes()).unwrap();
        assert_eq!(codes(&mut r), (vec![5], 0), "not past it before it is sealed");
        old.write_all(&line(7).as_bytes()[..5]).unwrap(); // cut short
        drop(old);
        spool.seal(Some(n)).unwrap();
        let (got, bad) = codes(&mut r);
        assert_eq!((got, bad), (vec![0], 1), "the cut line is one bad line");
        assert_eq!(codes(&mut r), (vec![6], 0), "then the next file");
        assert_eq!(spool.files().unwrap().len(), 1, "the read segment was removed");

        // A sealed rotation (no writer), bad and long lines.
        append(&cur, "garbage\n");
        append(&cur, &format!("{}\n", "x".repeat(MAX_LINE + 10)));
        append(&cur, &line(8));
        spool.rotate(true).unwrap();
        append(&cur, &line(9));
        let (got, bad) = codes(&mut r);
        assert_eq!((got, bad), (vec![0, 0, 8], 2));
        assert_eq!(codes(&mut r), (vec![9], 0));
        assert_eq!(r.backlog().unwrap(), 0);
        fs::remove_dir_all(&d).unwrap();
    }

    #[test]
    fn lines_are_counted_per_envoy_across_readers() {
        let d = tmp("writers");
        let spool = SpoolDir::create(&d).unwrap();
        let by = |w: u64| format!("{{\"code\":200,\"envoy\":\"{w}\"}}\n");
        let cur = spool.current();
        append(&cur, &line(1)); // an Envoy without an id
        append(&cur, &by(7));
        append(&cur, &by(7));
        append(&cur, "garbage\n"); // counted for the Envoy before it
        let mut r = SpoolReader::open(spool.clone()).unwrap();
        codes(&mut r);
        let w = |writer, lines| WriterLines { writer, lines };
        assert_eq!(r.writers(), Writers { current: w(7, 3), previous: w(0, 1) });
        append(&cur, &by(9));
        append(&cur, &by(9)[..6]);
        let mut r = SpoolReader::open(spool.clone()).unwrap(); // the next agent goes on
        codes(&mut r);
        assert_eq!(r.writers(), Writers { current: w(9, 1), previous: w(7, 3) });
        assert!(r.partial() && r.caught_up().unwrap(), "only a partial line is left");
        append(&cur, &by(9)[6..]);
        assert!(!r.caught_up().unwrap());
        codes(&mut r);
        assert_eq!(r.writers().current, w(9, 2));
        assert!(!r.partial() && r.caught_up().unwrap());
        // A position written before the per-Envoy counts.
        let old = Position::decode(b"00000000000000000012 00000000000000000034 00000000000000000056\n").unwrap();
        assert_eq!((old.inode, old.offset, old.lines, old.writers), (12, 34, 56, Writers::default()));
        let p = Position { inode: 1, offset: 2, lines: 3, writers: r.writers() };
        assert_eq!(Position::decode(&p.encode()), Some(p));
        fs::remove_dir_all(&d).unwrap();
    }

    /// A spool in `d` holding lines with codes 1 and 2, and a reader of it.
    fn two_lines(d: &Path) -> (SpoolDir, SpoolReader) {
        let spool = SpoolDir::create(d).unwrap();
        append(&spool.current(), &line(1));
        append(&spool.current(), &line(2));
        let r = SpoolReader::open(spool.clone()).unwrap();
        (spool, r)
    }

    #[test]
    fn uncommitted_lines_are_read_again_by_the_next_reader() {
        let d = tmp("commit");
        let (spool, mut r) = two_lines(&d);
        let mut n = 0;
        r.read(1, |_| n += 1).unwrap();
        r.commit().unwrap();
        r.read(1, |_| n += 1).unwrap(); // handed out, never committed
        assert_eq!(n, 2);
        let mut r = SpoolReader::open(spool).unwrap();
        assert_eq!(codes(&mut r), (vec![2], 0));
        fs::remove_dir_all(&d).unwrap();
    }

    #[test]
    fn a_reader_commits_marks_taken_earlier_and_stays_in_a_segment_until_its_end_is_committed() {
        let d = tmp("marks");
        let (spool, mut r) = two_lines(&d);
        let mut got = Vec::new();
        r.read(1, |e| got.push(e.unwrap().http.code)).unwrap();
        let first = r.handed_out().unwrap();
        r.read(1, |e| got.push(e.unwrap().http.code)).unwrap();
        let second = r.handed_out().unwrap();
        assert_eq!(got, [1, 2]);
        // The segment is sealed and a new file follows it; the reader has
        // handed out all of it, but only the first line is committed.
        spool.rotate(true).unwrap();
        append(&spool.current(), &line(3));
        r.commit_to(first).unwrap();
        assert!(!r.all_committed());
        assert_eq!(r.read(10, |e| got.push(e.unwrap().http.code)).unwrap().lines, 0, "waits for the commit");
        // A reader started now reads the second line again.
        let mut again = SpoolReader::open(spool.clone()).unwrap();
        assert_eq!(again.read(1, |e| assert_eq!(e.unwrap().http.code, 2)).unwrap().lines, 1);
        drop(again);
        r.commit_to(second).unwrap();
        assert!(r.all_committed());
        r.read(10, |e| got.push(e.unwrap().http.code)).unwrap();
        assert_eq!(got, [1, 2, 3]);
        fs::remove_dir_all(&d).unwrap();
    }
}
