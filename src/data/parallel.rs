//! Parallel corpora on disk, read line by line through a byte-offset index so that files larger
//! than memory stream, and a seeded, resumable order over them.

use std::fs::File;
use std::io::{BufRead, BufReader, Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};

use crate::pooling::TokenSpan;
use crate::{Error, Result};

/// A word of a sentence pair known to translate a word of the other side, with its inclusive
/// token span (counted with `[CLS]` at 0, as the ML-CTL reference does).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AnchorWord {
    /// The word as written in the sentence.
    pub word: String,
    /// Its inclusive token span.
    pub span: TokenSpan,
}

/// One sentence pair as read from a corpus.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RawPair {
    /// Source sentence.
    pub src: String,
    /// Target sentence.
    pub tgt: String,
    /// The anchor words, when the format carries them (the reference TSV does).
    pub anchors: Option<(AnchorWord, AnchorWord)>,
    /// Where the pair comes from, for error messages: file and 1-based line.
    pub origin: (PathBuf, usize),
}

/// The on-disk formats of parallel data.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CorpusFormat {
    /// ML-CTL's TSV: `src \t src_word \t start \t end \t tgt \t tgt_word \t start \t end`.
    ReferenceTsv(PathBuf),
    /// One `src ||| tgt` pair per line.
    Bitext(PathBuf),
    /// Two line-aligned files, one sentence per line.
    LineAligned {
        /// Source-language file.
        src: PathBuf,
        /// Target-language file.
        tgt: PathBuf,
    },
}

impl CorpusFormat {
    /// The format of training files named on a command line: with `tgt`, two line-aligned
    /// files; otherwise ML-CTL's TSV when `path` ends in `.tsv`, else `src ||| tgt` lines.
    pub fn from_paths(path: &Path, tgt: Option<&Path>) -> Self {
        match tgt {
            Some(tgt) => Self::LineAligned {
                src: path.to_path_buf(),
                tgt: tgt.to_path_buf(),
            },
            None if path.extension().is_some_and(|e| e == "tsv") => {
                Self::ReferenceTsv(path.to_path_buf())
            }
            None => Self::Bitext(path.to_path_buf()),
        }
    }
}

/// Byte offsets of the starts of a file's lines.
#[derive(Debug, Clone)]
struct LineIndex {
    path: PathBuf,
    starts: Vec<u64>,
}

impl LineIndex {
    fn build(path: &Path) -> Result<Self> {
        let file = File::open(path).map_err(Error::io(path))?;
        let mut reader = BufReader::with_capacity(1 << 20, file);
        let (mut starts, mut offset, mut buf) = (Vec::new(), 0u64, Vec::new());
        loop {
            buf.clear();
            let n = reader
                .read_until(b'\n', &mut buf)
                .map_err(Error::io(path))?;
            if n == 0 {
                break;
            }
            starts.push(offset);
            offset += n as u64;
        }
        Ok(Self {
            path: path.to_path_buf(),
            starts,
        })
    }

    fn read(&self, file: &mut File, line: usize) -> Result<String> {
        let start = self.starts[line];
        let end = self.starts.get(line + 1).copied();
        file.seek(SeekFrom::Start(start))
            .map_err(Error::io(&self.path))?;
        let mut bytes = Vec::new();
        match end {
            Some(end) => {
                bytes.resize((end - start) as usize, 0);
                file.read_exact(&mut bytes).map_err(Error::io(&self.path))?;
            }
            None => {
                file.read_to_end(&mut bytes)
                    .map_err(Error::io(&self.path))?;
            }
        }
        let text = String::from_utf8(bytes).map_err(|_| Error::Data {
            path: self.path.clone(),
            line: line + 1,
            reason: "not valid UTF-8".into(),
        })?;
        Ok(text.trim_end_matches(['\n', '\r']).to_string())
    }
}

/// A parallel corpus with random access to its pairs by line.
///
/// Opening it reads each file once to index line starts (8 bytes a line); pairs are then read
/// and parsed on demand, so corpora larger than memory work.
#[derive(Debug)]
pub struct ParallelCorpus {
    format: CorpusFormat,
    primary: LineIndex,
    secondary: Option<LineIndex>,
    files: (File, Option<File>),
}

impl ParallelCorpus {
    /// Opens and indexes a corpus.
    pub fn open(format: CorpusFormat) -> Result<Self> {
        let (primary, secondary) = match &format {
            CorpusFormat::ReferenceTsv(p) | CorpusFormat::Bitext(p) => (LineIndex::build(p)?, None),
            CorpusFormat::LineAligned { src, tgt } => {
                let (s, t) = (LineIndex::build(src)?, LineIndex::build(tgt)?);
                if s.starts.len() != t.starts.len() {
                    return Err(Error::Data {
                        path: tgt.clone(),
                        line: t.starts.len().min(s.starts.len()) + 1,
                        reason: format!(
                            "{} has {} lines but {} has {}",
                            src.display(),
                            s.starts.len(),
                            tgt.display(),
                            t.starts.len()
                        ),
                    });
                }
                (s, Some(t))
            }
        };
        let open = |p: &Path| File::open(p).map_err(Error::io(p));
        let files = (
            open(&primary.path)?,
            secondary.as_ref().map(|s| open(&s.path)).transpose()?,
        );
        Ok(Self {
            format,
            primary,
            secondary,
            files,
        })
    }

    /// The format the corpus was opened with.
    pub fn format(&self) -> &CorpusFormat {
        &self.format
    }

    /// Number of pairs (lines).
    pub fn len(&self) -> usize {
        self.primary.starts.len()
    }

    /// True when the corpus has no lines.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Reads and parses pair `i` (0-based line); a malformed line is an [`Error::Data`] naming
    /// the file and line.
    pub fn get(&mut self, i: usize) -> Result<RawPair> {
        if i >= self.len() {
            return Err(Error::InvalidArgument(format!(
                "pair {i} of a corpus of {}",
                self.len()
            )));
        }
        let line = self.primary.read(&mut self.files.0, i)?;
        let origin = (self.primary.path.clone(), i + 1);
        let bad = |reason: String| Error::Data {
            path: origin.0.clone(),
            line: i + 1,
            reason,
        };
        match &self.format {
            CorpusFormat::ReferenceTsv(_) => parse_tsv(&line, origin.clone()).map_err(bad),
            CorpusFormat::Bitext(_) => {
                let (src, tgt) = line
                    .split_once("|||")
                    .ok_or_else(|| bad("no ` ||| ` separator".into()))?;
                Ok(RawPair {
                    src: src.trim().into(),
                    tgt: tgt.trim().into(),
                    anchors: None,
                    origin,
                })
            }
            CorpusFormat::LineAligned { .. } => {
                let (index, file) = (self.secondary.as_ref(), self.files.1.as_mut());
                let tgt = match (index, file) {
                    (Some(index), Some(file)) => index.read(file, i)?,
                    _ => unreachable!("line-aligned corpora open both files"),
                };
                Ok(RawPair {
                    src: line.trim().into(),
                    tgt: tgt.trim().into(),
                    anchors: None,
                    origin,
                })
            }
        }
    }
}

fn parse_tsv(line: &str, origin: (PathBuf, usize)) -> std::result::Result<RawPair, String> {
    let fields: Vec<&str> = line.split('\t').collect();
    if fields.len() != 8 {
        return Err(format!(
            "expected 8 tab-separated fields, found {}",
            fields.len()
        ));
    }
    let span = |start: &str, end: &str, side: &str| -> std::result::Result<TokenSpan, String> {
        let parse = |s: &str| {
            s.trim()
                .parse::<usize>()
                .map_err(|_| format!("{side} span bound `{s}` is not a number"))
        };
        let (start, end) = (parse(start)?, parse(end)?);
        if start == 0 || end < start {
            return Err(format!(
                "{side} span {start}..={end} is empty or covers [CLS]"
            ));
        }
        Ok(TokenSpan { start, end })
    };
    let anchor = |word: &str,
                  start: &str,
                  end: &str,
                  side: &str|
     -> std::result::Result<AnchorWord, String> {
        Ok(AnchorWord {
            word: word.to_string(),
            span: span(start, end, side)?,
        })
    };
    let (src, tgt) = (fields[0].trim(), fields[4].trim());
    if src.is_empty() || tgt.is_empty() {
        return Err("empty sentence".into());
    }
    Ok(RawPair {
        src: src.into(),
        tgt: tgt.into(),
        anchors: Some((
            anchor(fields[1], fields[2], fields[3], "source")?,
            anchor(fields[5], fields[6], fields[7], "target")?,
        )),
        origin,
    })
}
