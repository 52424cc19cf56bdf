//! The Tatoeba tables: per language and averaged over the zero-shot, the trained and all
//! languages, one column per model.

use super::{Direction, LanguageGroup, TatoebaLanguageInfo, TatoebaReport};

/// Markdown tables of one or more models' [`TatoebaReport`]s (e.g. `[("before", b), ("after",
/// a)]`), one table per pooling of the first report: accuracy in % for each language as
/// `en→xx / xx→en`, the zero-shot languages first with their average, then the trained ones
/// (scored on their held-apart lines only) with theirs, then the average over all.
pub fn tatoeba_markdown(models: &[(&str, &TatoebaReport)]) -> String {
    let Some((_, first)) = models.first() else {
        return String::new();
    };
    let mut s = String::new();
    for (p, pooling) in first.poolings.iter().enumerate() {
        s += &format!(
            "\n## Tatoeba, XTREME's {} languages: acc@1 (%), {}, en→xx / xx→en\n\n",
            first.languages.len(),
            pooling.label
        );
        if p == 0 {
            s += "en→xx (English sentences retrieve their translation) is XTREME's score; \
                  averages count each language once.\n\n";
        }
        let names: String = models
            .iter()
            .map(|(name, _)| format!(" {name} |"))
            .collect();
        s += &format!(
            "| language | lines |{names}\n|---|---|{}\n",
            "---|".repeat(models.len())
        );
        let groups = [
            (LanguageGroup::ZeroShot, "zero-shot"),
            (LanguageGroup::Trained, "trained (held-apart lines only)"),
        ];
        for (group, name) in groups {
            let languages = first.group(group);
            if languages.is_empty() {
                continue;
            }
            for language in &languages {
                s += &language_row(models, p, language);
            }
            s += &average_row(models, p, group, &format!("{} {name}", languages.len()));
        }
        s += &average_row(models, p, LanguageGroup::All, "all languages");
    }
    s
}

/// `| fr (fra) | 1-1000 | 93.1 / 92.0 | … |`.
fn language_row(
    models: &[(&str, &TatoebaReport)],
    p: usize,
    language: &TatoebaLanguageInfo,
) -> String {
    let last = language.first_line + language.pairs - 1;
    let mut row = format!(
        "| {} ({}) | {}-{last} |",
        language.code, language.laser, language.first_line
    );
    for (_, report) in models {
        let scores = report
            .poolings
            .get(p)
            .and_then(|pooling| pooling.scores.get(&language.code));
        row += &match scores {
            Some(s) => format!(
                " {:.1} / {:.1} |",
                100.0 * Direction::EnToXx.of(s),
                100.0 * Direction::XxToEn.of(s)
            ),
            None => " - |".into(),
        };
    }
    row + "\n"
}

/// `| **average, 31 zero-shot** | | **60.1** / 58.2 | … |`.
fn average_row(
    models: &[(&str, &TatoebaReport)],
    p: usize,
    group: LanguageGroup,
    name: &str,
) -> String {
    let mut row = format!("| **average, {name}** | |");
    for (_, report) in models {
        let en = report.average(p, group, Direction::EnToXx);
        let xx = report.average(p, group, Direction::XxToEn);
        row += &match (en, xx) {
            (Some(en), Some(xx)) => format!(" **{en:.1}** / {xx:.1} |"),
            _ => " - |".into(),
        };
    }
    row + "\n"
}
