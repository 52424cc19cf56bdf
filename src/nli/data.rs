//! Natural language inference data in the official XNLI and MultiNLI formats.
//!
//! - XNLI-1.0 `xnli.dev.tsv` / `xnli.test.tsv`: every language in one tab-separated file
//!   ([`read_nli_tsv`]);
//! - XNLI-MT-1.0 `multinli.train.<lang>.tsv` (header `premise\thypo\tlabel`) and GLUE-style
//!   `train.tsv` ([`read_nli_tsv`] as well: columns are found by header name);
//! - MultiNLI `multinli_1.0_train.jsonl` (and XNLI's `xnli.{dev,test}.jsonl`) ([`read_nli_jsonl`]);
//! - [`XnliDir::discover`] finds those files in a downloaded-and-unpacked directory.
//!
//! Lines are read as they are: fields are split on tabs with no quote handling (the files
//! contain unbalanced `"`; Python readers use `quoting=csv.QUOTE_NONE` for the same reason),
//! a trailing `\r` is dropped and blank lines are skipped and counted.

use std::collections::BTreeMap;
use std::fmt;
use std::fs::File;
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};

use crate::{Error, Result};

/// The three NLI classes, in the order used for class indices (MultiNLI's and XNLI's order
/// in Hugging Face `datasets`: entailment 0, neutral 1, contradiction 2).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum NliLabel {
    /// The premise entails the hypothesis.
    Entailment,
    /// Neither entailment nor contradiction.
    Neutral,
    /// The premise contradicts the hypothesis.
    Contradiction,
}

impl NliLabel {
    /// The labels in class-index order.
    pub const ALL: [NliLabel; 3] = [
        NliLabel::Entailment,
        NliLabel::Neutral,
        NliLabel::Contradiction,
    ];

    /// The class index: entailment 0, neutral 1, contradiction 2.
    pub fn index(self) -> usize {
        self as usize
    }

    /// The label of a class index, if it is 0, 1 or 2.
    pub fn from_index(index: usize) -> Option<Self> {
        Self::ALL.get(index).copied()
    }

    /// Parses a label as the official files write it: `entailment`, `neutral`,
    /// `contradiction`, or XNLI-MT's `contradictory` (ASCII case and surrounding spaces are
    /// ignored). MultiNLI's `-` (no annotator consensus) is not a label: `None`.
    pub fn parse(text: &str) -> Option<Self> {
        let text = text.trim();
        let is = |name: &str| text.eq_ignore_ascii_case(name);
        if is("entailment") {
            Some(Self::Entailment)
        } else if is("neutral") {
            Some(Self::Neutral)
        } else if is("contradiction") || is("contradictory") {
            Some(Self::Contradiction)
        } else {
            None
        }
    }

    /// The label's name as MultiNLI writes it.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Entailment => "entailment",
            Self::Neutral => "neutral",
            Self::Contradiction => "contradiction",
        }
    }
}

impl fmt::Display for NliLabel {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// One premise / hypothesis pair with its gold label and language.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NliExample {
    /// The premise (`sentence1`).
    pub premise: String,
    /// The hypothesis (`sentence2`).
    pub hypothesis: String,
    /// The gold label.
    pub label: NliLabel,
    /// The language code as the file writes it (`en`, `fr`, `zh`, ...).
    pub language: String,
}

/// How to read an NLI file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NliReadOptions {
    /// Keep only examples of these languages (compared exactly with the file's codes); empty
    /// keeps every language.
    pub languages: Vec<String>,
    /// Skip malformed lines (wrong column count, unknown label, invalid JSON, missing field)
    /// and count them in [`NliReadStats::bad_lines`] instead of failing with [`Error::Data`].
    pub skip_bad_lines: bool,
    /// The language of examples from files without a language column or field (XNLI-MT,
    /// MultiNLI); [`XnliDir`] sets it from the file name.
    pub default_language: String,
}

impl Default for NliReadOptions {
    /// Every language, bad lines are errors, `en` for files without a language column.
    fn default() -> Self {
        Self {
            languages: Vec::new(),
            skip_bad_lines: false,
            default_language: "en".into(),
        }
    }
}

impl NliReadOptions {
    /// Keeps only the given languages.
    pub fn with_languages<S: Into<String>>(
        mut self,
        languages: impl IntoIterator<Item = S>,
    ) -> Self {
        self.languages = languages.into_iter().map(Into::into).collect();
        self
    }

    /// Skips and counts malformed lines instead of failing.
    pub fn skipping_bad_lines(mut self) -> Self {
        self.skip_bad_lines = true;
        self
    }

    fn keeps(&self, language: &str) -> bool {
        self.languages.is_empty() || self.languages.iter().any(|l| l == language)
    }
}

/// What reading a file did with its lines. Every data line (the header excluded) is counted in
/// exactly one of `kept`, `no_gold_label`, `other_language`, `bad_lines` and `blank_lines`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct NliReadStats {
    /// Data lines read (the header excluded).
    pub lines: usize,
    /// Examples returned.
    pub kept: usize,
    /// Lines whose gold label is `-` (no annotator consensus in MultiNLI), skipped.
    pub no_gold_label: usize,
    /// Lines of languages not asked for, skipped.
    pub other_language: usize,
    /// Malformed lines, skipped (only with [`NliReadOptions::skip_bad_lines`]).
    pub bad_lines: usize,
    /// Empty lines, skipped.
    pub blank_lines: usize,
}

/// The examples of one file and what happened to its lines.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct NliData {
    /// The examples, in file order.
    pub examples: Vec<NliExample>,
    /// Line counts.
    pub stats: NliReadStats,
}

impl NliData {
    /// Number of examples of each language.
    pub fn language_counts(&self) -> BTreeMap<String, usize> {
        let mut counts = BTreeMap::new();
        for e in &self.examples {
            *counts.entry(e.language.clone()).or_insert(0) += 1;
        }
        counts
    }
}

/// Outcome of parsing one data line.
enum LineOutcome {
    Example(NliExample),
    NoGoldLabel,
    OtherLanguage,
}

/// Reads lines as UTF-8 with their 1-based numbers, without the line break (`\n` or `\r\n`).
struct Lines {
    path: PathBuf,
    reader: BufReader<File>,
    number: usize,
    buf: Vec<u8>,
}

impl Lines {
    fn open(path: &Path) -> Result<Self> {
        let file = File::open(path).map_err(Error::io(path))?;
        Ok(Self {
            path: path.to_path_buf(),
            reader: BufReader::with_capacity(1 << 20, file),
            number: 0,
            buf: Vec::new(),
        })
    }

    /// The next line: `Ok(None)` at the end, `Ok(Some((n, Err(reason))))` for a line that is
    /// not UTF-8.
    #[allow(clippy::type_complexity)]
    fn next_line(&mut self) -> Result<Option<(usize, std::result::Result<&str, String>)>> {
        self.buf.clear();
        let read = self
            .reader
            .read_until(b'\n', &mut self.buf)
            .map_err(Error::io(&self.path))?;
        if read == 0 {
            return Ok(None);
        }
        self.number += 1;
        let mut bytes = &self.buf[..];
        if let Some(rest) = bytes.strip_suffix(b"\n") {
            bytes = rest;
        }
        if let Some(rest) = bytes.strip_suffix(b"\r") {
            bytes = rest;
        }
        if self.number == 1 {
            if let Some(rest) = bytes.strip_prefix("\u{feff}".as_bytes()) {
                bytes = rest;
            }
        }
        let text = std::str::from_utf8(bytes).map_err(|e| format!("not valid UTF-8 ({e})"));
        Ok(Some((self.number, text)))
    }

    fn data_error(&self, line: usize, reason: impl Into<String>) -> Error {
        Error::Data {
            path: self.path.clone(),
            line,
            reason: reason.into(),
        }
    }
}

/// Counts a parsed line or, for a malformed one, fails or counts it as the options say.
fn record(
    outcome: std::result::Result<LineOutcome, String>,
    lines: &Lines,
    line: usize,
    options: &NliReadOptions,
    data: &mut NliData,
) -> Result<()> {
    match outcome {
        Ok(LineOutcome::Example(example)) => {
            data.stats.kept += 1;
            data.examples.push(example);
        }
        Ok(LineOutcome::NoGoldLabel) => data.stats.no_gold_label += 1,
        Ok(LineOutcome::OtherLanguage) => data.stats.other_language += 1,
        Err(_) if options.skip_bad_lines => data.stats.bad_lines += 1,
        Err(reason) => return Err(lines.data_error(line, reason)),
    }
    Ok(())
}

/// Builds an example from its fields, applying the `-` and language rules.
fn make_example(
    premise: &str,
    hypothesis: &str,
    label: &str,
    language: &str,
    options: &NliReadOptions,
) -> std::result::Result<LineOutcome, String> {
    let label = match NliLabel::parse(label) {
        Some(label) => label,
        None if label.trim() == "-" => return Ok(LineOutcome::NoGoldLabel),
        None => {
            return Err(format!(
                "unknown label `{label}` (expected entailment, neutral, contradiction, \
                 contradictory or -)"
            ))
        }
    };
    if !options.keeps(language) {
        return Ok(LineOutcome::OtherLanguage);
    }
    Ok(LineOutcome::Example(NliExample {
        premise: premise.to_string(),
        hypothesis: hypothesis.to_string(),
        label,
        language: language.to_string(),
    }))
}

/// Header names accepted for each field, in order of preference.
const PREMISE_COLUMNS: [&str; 2] = ["sentence1", "premise"];
const HYPOTHESIS_COLUMNS: [&str; 3] = ["sentence2", "hypo", "hypothesis"];
const LABEL_COLUMNS: [&str; 2] = ["gold_label", "label"];
const LANGUAGE_COLUMN: &str = "language";

/// Reads a tab-separated NLI file with a header line, finding the columns by name:
///
/// - premise: `sentence1`, else `premise`;
/// - hypothesis: `sentence2`, else `hypo`, else `hypothesis`;
/// - label: `gold_label`, else `label`;
/// - language: `language` when present (XNLI-1.0), else [`NliReadOptions::default_language`].
///
/// Other columns (`sentence1_binary_parse`, `pairID`, `promptID`, `genre`, `label1`..) are
/// ignored. This covers XNLI-1.0's `xnli.{dev,test}.tsv`, XNLI-MT's
/// `multinli.train.<lang>.tsv` (`premise\thypo\tlabel`) and GLUE MNLI's `train.tsv`.
///
/// Every data line must have as many fields as the header; the label must parse with
/// [`NliLabel::parse`] or be `-` (skipped, counted in [`NliReadStats::no_gold_label`]).
/// A header without the needed columns, or an empty file, is an [`Error::Data`] on line 1
/// whatever the options.
pub fn read_nli_tsv(path: impl AsRef<Path>, options: &NliReadOptions) -> Result<NliData> {
    let mut lines = Lines::open(path.as_ref())?;
    let header: Vec<String> = match lines.next_line()? {
        None => return Err(lines.data_error(1, "empty file: expected a header line")),
        Some((n, Err(reason))) => return Err(lines.data_error(n, reason)),
        Some((_, Ok(text))) => text.split('\t').map(|s| s.trim().to_string()).collect(),
    };
    let find = |names: &[&str]| -> Result<usize> {
        names
            .iter()
            .find_map(|name| header.iter().position(|h| h == name))
            .ok_or_else(|| {
                lines.data_error(
                    1,
                    format!(
                        "the header has no column named {}; it has: {}",
                        names
                            .iter()
                            .map(|n| format!("`{n}`"))
                            .collect::<Vec<_>>()
                            .join(" or "),
                        header.join(", ")
                    ),
                )
            })
    };
    let premise = find(&PREMISE_COLUMNS)?;
    let hypothesis = find(&HYPOTHESIS_COLUMNS)?;
    let label = find(&LABEL_COLUMNS)?;
    let language = header.iter().position(|h| h == LANGUAGE_COLUMN);
    let columns = header.len();

    let mut data = NliData::default();
    while let Some((n, text)) = lines.next_line()? {
        data.stats.lines += 1;
        let outcome = match text {
            Ok("") => {
                data.stats.blank_lines += 1;
                continue;
            }
            Err(reason) => Err(reason),
            Ok(text) => {
                let fields: Vec<&str> = text.split('\t').collect();
                if fields.len() != columns {
                    Err(format!(
                        "expected {columns} tab-separated fields (as in the header), found {}",
                        fields.len()
                    ))
                } else {
                    let lang = language.map_or(options.default_language.as_str(), |i| fields[i]);
                    make_example(
                        fields[premise],
                        fields[hypothesis],
                        fields[label],
                        lang.trim(),
                        options,
                    )
                }
            }
        };
        record(outcome, &lines, n, options, &mut data)?;
    }
    Ok(data)
}

/// Reads a JSON-lines NLI file: MultiNLI's `multinli_1.0_{train,dev_matched,..}.jsonl` or
/// XNLI-1.0's `xnli.{dev,test}.jsonl`. Each non-blank line is one JSON object with the string
/// fields `gold_label`, `sentence1` (premise) and `sentence2` (hypothesis), and optionally
/// `language` (else [`NliReadOptions::default_language`]); other fields are ignored.
///
/// A `gold_label` of `-` (no annotator consensus) is skipped and counted in
/// [`NliReadStats::no_gold_label`]. Invalid JSON, a missing or non-string field or an unknown
/// label is a malformed line.
pub fn read_nli_jsonl(path: impl AsRef<Path>, options: &NliReadOptions) -> Result<NliData> {
    let mut lines = Lines::open(path.as_ref())?;
    let mut data = NliData::default();
    while let Some((n, text)) = lines.next_line()? {
        data.stats.lines += 1;
        let outcome = match text {
            Ok(t) if t.trim().is_empty() => {
                data.stats.blank_lines += 1;
                continue;
            }
            Err(reason) => Err(reason),
            Ok(text) => parse_json_line(text, options),
        };
        record(outcome, &lines, n, options, &mut data)?;
    }
    Ok(data)
}

fn parse_json_line(
    text: &str,
    options: &NliReadOptions,
) -> std::result::Result<LineOutcome, String> {
    let value: serde_json::Value =
        serde_json::from_str(text).map_err(|e| format!("invalid JSON: {e}"))?;
    let object = value
        .as_object()
        .ok_or_else(|| "expected a JSON object".to_string())?;
    let field = |name: &str| -> std::result::Result<&str, String> {
        match object.get(name) {
            Some(serde_json::Value::String(s)) => Ok(s),
            Some(other) => Err(format!("field `{name}` is not a string: {other}")),
            None => Err(format!("missing field `{name}`")),
        }
    };
    let label = field("gold_label")?;
    let premise = field("sentence1")?;
    let hypothesis = field("sentence2")?;
    let language = match object.get(LANGUAGE_COLUMN) {
        None => options.default_language.as_str(),
        Some(_) => field(LANGUAGE_COLUMN)?,
    };
    make_example(premise, hypothesis, label, language.trim(), options)
}

/// The on-disk format of an NLI file.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NliFormat {
    /// Tab-separated with a header ([`read_nli_tsv`]).
    Tsv,
    /// JSON lines ([`read_nli_jsonl`]).
    Jsonl,
}

/// An NLI file, its format and the language of its examples when the file does not say.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NliFile {
    /// The file.
    pub path: PathBuf,
    /// How to read it.
    pub format: NliFormat,
    /// The language of examples without a language column or field.
    pub default_language: String,
}

impl NliFile {
    /// A file whose format follows its extension (`.jsonl` is JSON lines, anything else
    /// tab-separated) and whose language defaults to `en`.
    pub fn new(path: impl Into<PathBuf>) -> Self {
        let path = path.into();
        let format = match path.extension().and_then(|e| e.to_str()) {
            Some("jsonl") => NliFormat::Jsonl,
            _ => NliFormat::Tsv,
        };
        Self {
            path,
            format,
            default_language: "en".into(),
        }
    }

    /// Reads the file; `options.default_language` is replaced by the file's.
    pub fn read(&self, options: &NliReadOptions) -> Result<NliData> {
        let options = NliReadOptions {
            default_language: self.default_language.clone(),
            ..options.clone()
        };
        match self.format {
            NliFormat::Tsv => read_nli_tsv(&self.path, &options),
            NliFormat::Jsonl => read_nli_jsonl(&self.path, &options),
        }
    }
}

/// The files of an XNLI directory (`--xnli-dir`): the English training data and the
/// multilingual evaluation sets.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct XnliDir {
    /// The directory searched.
    pub root: PathBuf,
    /// The English training file.
    pub train: NliFile,
    /// `xnli.dev.tsv`, when found.
    pub dev: Option<NliFile>,
    /// `xnli.test.tsv`, when found.
    pub test: Option<NliFile>,
}

impl XnliDir {
    /// Where [`XnliDir::discover`] looks for the English training file, in order of preference,
    /// relative to the root.
    pub const TRAIN_CANDIDATES: [&'static str; 7] = [
        "XNLI-MT-1.0/multinli/multinli.train.en.tsv",
        "multinli/multinli.train.en.tsv",
        "multinli.train.en.tsv",
        "multinli_1.0/multinli_1.0_train.jsonl",
        "multinli_1.0_train.jsonl",
        "train.tsv",
        "train.jsonl",
    ];
    /// Where it looks for the dev set, in order of preference.
    pub const DEV_CANDIDATES: [&'static str; 2] = ["XNLI-1.0/xnli.dev.tsv", "xnli.dev.tsv"];
    /// Where it looks for the test set, in order of preference.
    pub const TEST_CANDIDATES: [&'static str; 2] = ["XNLI-1.0/xnli.test.tsv", "xnli.test.tsv"];

    /// Finds the files under `root`, laid out as the official archives unpack
    /// (`XNLI-1.0.zip`, `XNLI-MT-1.0.zip`, `multinli_1.0.zip`) or flat: the first existing
    /// path of [`XnliDir::TRAIN_CANDIDATES`], [`XnliDir::DEV_CANDIDATES`] and
    /// [`XnliDir::TEST_CANDIDATES`].
    ///
    /// A training file and at least one of dev and test must exist; otherwise the error (an
    /// [`Error::Io`] of kind `NotFound` on `root`) lists every path searched for what is
    /// missing.
    pub fn discover(root: impl AsRef<Path>) -> Result<Self> {
        let root = root.as_ref();
        if !root.is_dir() {
            return Err(Error::Io {
                path: root.to_path_buf(),
                source: std::io::Error::new(
                    std::io::ErrorKind::NotFound,
                    "not a directory (expected an XNLI directory)",
                ),
            });
        }
        let first = |candidates: &[&str]| {
            candidates
                .iter()
                .map(|c| root.join(c))
                .find(|p| p.is_file())
        };
        let train = first(&Self::TRAIN_CANDIDATES);
        let dev = first(&Self::DEV_CANDIDATES);
        let test = first(&Self::TEST_CANDIDATES);
        let mut missing = Vec::new();
        if train.is_none() {
            missing.push(format!(
                "an English training file (searched {})",
                Self::TRAIN_CANDIDATES.join(", ")
            ));
        }
        if dev.is_none() && test.is_none() {
            missing.push(format!(
                "an evaluation file (searched {})",
                Self::DEV_CANDIDATES
                    .iter()
                    .chain(&Self::TEST_CANDIDATES)
                    .copied()
                    .collect::<Vec<_>>()
                    .join(", ")
            ));
        }
        match train {
            Some(train) if missing.is_empty() => Ok(Self {
                root: root.to_path_buf(),
                train: NliFile::new(train),
                dev: dev.map(NliFile::new),
                test: test.map(NliFile::new),
            }),
            _ => Err(Error::Io {
                path: root.to_path_buf(),
                source: std::io::Error::new(
                    std::io::ErrorKind::NotFound,
                    format!("no XNLI data found: missing {}", missing.join("; and ")),
                ),
            }),
        }
    }

    /// Reads the training file.
    pub fn read_train(&self, options: &NliReadOptions) -> Result<NliData> {
        self.train.read(options)
    }

    /// Reads the dev set; an [`Error::InvalidArgument`] when the directory has none.
    pub fn read_dev(&self, options: &NliReadOptions) -> Result<NliData> {
        self.dev
            .as_ref()
            .ok_or_else(|| {
                Error::InvalidArgument(format!("{} has no xnli.dev.tsv", self.root.display()))
            })?
            .read(options)
    }

    /// Reads the test set; an [`Error::InvalidArgument`] when the directory has none.
    pub fn read_test(&self, options: &NliReadOptions) -> Result<NliData> {
        self.test
            .as_ref()
            .ok_or_else(|| {
                Error::InvalidArgument(format!("{} has no xnli.test.tsv", self.root.display()))
            })?
            .read(options)
    }

    /// Reads the set to report results on: the test set, or the dev set when the directory
    /// has no test file, saying so in [`XnliEval::fallback`].
    ///
    /// Only an absent test file falls back: a test file that cannot be read (malformed lines
    /// without [`NliReadOptions::skip_bad_lines`], bad encoding, no permission) is an error,
    /// since results on the dev set are not comparable with published test-set results.
    pub fn read_eval(&self, options: &NliReadOptions) -> Result<XnliEval> {
        let (split, file, fallback) = match (&self.test, &self.dev) {
            (Some(test), _) => (XnliSplit::Test, test, None),
            (None, Some(dev)) => (
                XnliSplit::Dev,
                dev,
                Some(format!(
                    "no test file under {} (searched {})",
                    self.root.display(),
                    Self::TEST_CANDIDATES.join(", ")
                )),
            ),
            (None, None) => {
                return Err(Error::InvalidArgument(format!(
                    "{} has neither xnli.test.tsv nor xnli.dev.tsv",
                    self.root.display()
                )))
            }
        };
        Ok(XnliEval {
            split,
            path: file.path.clone(),
            fallback,
            data: file.read(options)?,
        })
    }
}

/// An XNLI evaluation split.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum XnliSplit {
    /// `xnli.dev.tsv` (2,490 pairs per language in XNLI-1.0).
    Dev,
    /// `xnli.test.tsv` (5,010 pairs per language): the split results are published on.
    Test,
}

impl XnliSplit {
    /// `dev` or `test`.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Dev => "dev",
            Self::Test => "test",
        }
    }
}

impl fmt::Display for XnliSplit {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The evaluation set [`XnliDir::read_eval`] read: which split, from which file, and why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct XnliEval {
    /// The split read.
    pub split: XnliSplit,
    /// The file read.
    pub path: PathBuf,
    /// Why the dev split was read in place of the test split; `None` when the test split was
    /// read.
    pub fallback: Option<String>,
    /// Its examples.
    pub data: NliData,
}

impl XnliEval {
    /// One line for a results file: `XNLI test split (<path>)`, or for the dev split
    /// `XNLI dev split (<path>), not test: <why>`.
    pub fn split_note(&self) -> String {
        let mut note = format!("XNLI {} split ({})", self.split, self.path.display());
        if let Some(why) = &self.fallback {
            note += &format!(", not test: {why}");
        }
        note
    }
}
