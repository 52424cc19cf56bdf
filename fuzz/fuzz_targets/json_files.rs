//! The JSON files of a model or run directory, selected by the first byte: `config.json`
//! (read, validated, written back: a config that reads must write the same text again),
//! `mlctl.json`, `evaluation.json` and `metrics.jsonl`.
#![no_main]

use libfuzzer_sys::fuzz_target;
use mlctl::encoder::BertConfig;
use mlctl::model::HeadConfig;
use mlctl::pretrain::{read_evaluations, read_metrics};
use mlctl_fuzz::fresh_dir;

fuzz_target!(|data: &[u8]| {
    let Some((&selector, rest)) = data.split_first() else {
        return;
    };
    let dir = fresh_dir("json");
    match selector % 4 {
        0 => {
            let path = dir.join("config.json");
            std::fs::write(&path, rest).unwrap();
            if let Ok(cfg) = BertConfig::from_file(&path) {
                let _ = (cfg.head_size(), cfg.max_sequence_length(), cfg.model_type());
                let text = cfg.to_json_string();
                std::fs::write(&path, &text).unwrap();
                let back = BertConfig::from_file(&path).expect("a written config reads back");
                assert_eq!(back.to_json_string(), text);
            }
        }
        1 => {
            if let Ok(head) = serde_json::from_slice::<HeadConfig>(rest) {
                let text = serde_json::to_string(&head).unwrap();
                assert_eq!(serde_json::from_str::<HeadConfig>(&text).unwrap(), head);
            }
        }
        2 => {
            std::fs::write(dir.join(mlctl::pretrain::EVALUATION_FILE), rest).unwrap();
            if let Ok(evaluations) = read_evaluations(&dir) {
                mlctl::pretrain::write_evaluations(&dir, &evaluations).unwrap();
            }
        }
        _ => {
            std::fs::write(dir.join(mlctl::train::METRICS_FILE), rest).unwrap();
            let _ = read_metrics(&dir);
        }
    }
});
