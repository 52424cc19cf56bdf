//! Checkpoints: one file of a complete training checkpoint of the tiny model replaced by the
//! input, the first byte choosing which and how it is read. `trainer_state.json`,
//! `optimizer.safetensors`, `model.safetensors` or `mlctl_head.safetensors` are read by
//! `Trainer::resume`; `mlctl.json`, `model.safetensors` or `mlctl_head.safetensors` by
//! `MlCtlModel::load`. Whatever loads then takes a training step. (`config.json` is the
//! `json_files` target's: a fuzzed one would ask for models of any size.)
#![no_main]

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use candle_core::{DType, Device};
use libfuzzer_sys::fuzz_target;
use mlctl::data::{CorpusFormat, LoaderConfig, PairLoader, ParallelCorpus};
use mlctl::encoder::BertConfig;
use mlctl::pretrained::PretrainedBert;
use mlctl::loss::MultiLevelLoss;
use mlctl::model::MlCtlModel;
use mlctl::tokenize::Tokenizer;
use mlctl::train::{TrainConfig, Trainer};
use mlctl_fuzz::{fixture, fresh_dir, scratch};

const CORPUS: &str = "cat dog bird fish\tdog\t2\t2\tsun moon water home\tmoon\t2\t2\n\
                      red blue green big\tgreen\t3\t3\tday night play run\tnight\t2\t2\n\
                      happy sad quick brown\thappy\t1\t1\tjump walk eat sleep\tsleep\t4\t4\n\
                      house tree park garden\tpark\t3\t3\tread sing rain car\train\t3\t3\n";

fn tiny_model(seed: u64) -> MlCtlModel {
    let cfg = BertConfig::from_file(fixture("tiny_bert/config.json")).unwrap();
    let tok = Tokenizer::from_file(fixture("tiny_bert/tokenizer.json")).unwrap();
    let bert = PretrainedBert::from_config(cfg, Some(tok), &Device::Cpu, DType::F32, seed).unwrap();
    MlCtlModel::new(bert, Default::default(), seed).unwrap()
}

fn corpus_path() -> &'static Path {
    static PATH: OnceLock<PathBuf> = OnceLock::new();
    PATH.get_or_init(|| {
        let path = scratch().join("train.tsv");
        std::fs::write(&path, CORPUS).unwrap();
        path
    })
}

fn trainer(model: MlCtlModel, run: &Path) -> mlctl::Result<Trainer> {
    let tok = Tokenizer::from_file(fixture("tiny_bert/tokenizer.json"))?.with_max_len(16)?;
    let corpus = ParallelCorpus::open(CorpusFormat::ReferenceTsv(corpus_path().to_path_buf()))?;
    let loader = PairLoader::new(
        corpus,
        tok,
        LoaderConfig {
            batch_size: 2,
            ..Default::default()
        },
    )?;
    let config = TrainConfig {
        progress: false,
        ..TrainConfig::adam_linear_clipped(4)
    };
    Trainer::new(model, MultiLevelLoss::mlctl(), loader, config, run)
}

/// The files of a checkpoint after one training step, by name.
fn template() -> &'static BTreeMap<String, Vec<u8>> {
    static FILES: OnceLock<BTreeMap<String, Vec<u8>>> = OnceLock::new();
    FILES.get_or_init(|| {
        let run = fresh_dir("template-run");
        let mut t = trainer(tiny_model(1), &run).unwrap();
        t.train_step().unwrap();
        let dir = t.save_checkpoint().unwrap();
        std::fs::read_dir(&dir)
            .unwrap()
            .map(|e| {
                let path = e.unwrap().path();
                let name = path.file_name().unwrap().to_str().unwrap().to_owned();
                (name, std::fs::read(&path).unwrap())
            })
            .collect()
    })
}

const CASES: [(&str, bool); 7] = [
    ("trainer_state.json", true),
    ("optimizer.safetensors", true),
    ("model.safetensors", true),
    ("mlctl_head.safetensors", true),
    ("mlctl.json", false),
    ("model.safetensors", false),
    ("mlctl_head.safetensors", false),
];

fuzz_target!(init: mlctl_fuzz::allow_caught_panics(), |data: &[u8]| {
    let Some((&selector, rest)) = data.split_first() else {
        return;
    };
    let (file, resume) = CASES[usize::from(selector) % CASES.len()];
    let files = template();
    let run = fresh_dir("run");
    let dir = run.join("checkpoints").join("step-00000001");
    std::fs::create_dir_all(&dir).unwrap();
    for (name, bytes) in files {
        let bytes = if name == file { rest } else { bytes.as_slice() };
        std::fs::write(dir.join(name), bytes).unwrap();
    }
    if resume {
        let mut t = trainer(tiny_model(2), &run).unwrap();
        if t.resume().is_ok() {
            let _ = t.train_step();
        }
    } else if let Ok(model) = MlCtlModel::load(dir.to_str().unwrap(), &Device::Cpu, DType::F32, 3) {
        let other = fresh_dir("run-loaded");
        if let Ok(mut t) = trainer(model, &other) {
            let _ = t.train_step();
        }
    }
});
