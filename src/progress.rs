//! One progress bar for long work (training, fine-tuning, encoding), drawn on standard error
//! only when asked for and only with the `progress` feature, so a library user can drop
//! `indicatif` and get silence.

/// A bar of `total` units; a hidden one when not shown (or built without `progress`).
pub(crate) struct Progress {
    #[cfg(feature = "progress")]
    bar: indicatif::ProgressBar,
}

impl Progress {
    /// A bar with `template` (indicatif's syntax), shown when `show` is true.
    #[allow(unused_variables)]
    pub(crate) fn new(show: bool, total: u64, template: &str) -> Self {
        #[cfg(feature = "progress")]
        {
            let bar = if show {
                indicatif::ProgressBar::new(total)
            } else {
                indicatif::ProgressBar::hidden()
            };
            bar.set_style(
                indicatif::ProgressStyle::with_template(template).expect("valid template"),
            );
            Self { bar }
        }
        #[cfg(not(feature = "progress"))]
        Self {}
    }

    /// Starts at `pos` units done (a resumed run).
    #[allow(unused_variables)]
    pub(crate) fn set_position(&self, pos: u64) {
        #[cfg(feature = "progress")]
        self.bar.set_position(pos);
    }

    /// `n` more units done; `message` is only formatted when the bar exists.
    #[allow(unused_variables)]
    pub(crate) fn inc(&self, n: u64, message: impl FnOnce() -> Option<String>) {
        #[cfg(feature = "progress")]
        {
            if let Some(m) = message() {
                self.bar.set_message(m);
            }
            self.bar.inc(n);
        }
    }

    /// Leaves the bar as it is (the work failed).
    pub(crate) fn abandon(&self) {
        #[cfg(feature = "progress")]
        self.bar.abandon();
    }

    /// Completes the bar and keeps it on screen.
    pub(crate) fn finish(&self) {
        #[cfg(feature = "progress")]
        self.bar.finish();
    }

    /// Completes the bar and erases it.
    pub(crate) fn finish_and_clear(&self) {
        #[cfg(feature = "progress")]
        self.bar.finish_and_clear();
    }
}
