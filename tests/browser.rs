//! `nanoflow report`'s page in a real browser: headless Chromium (Debian's `chromium`) loads
//! `report.html` from disk, logs no console message, and draws both plots (the screenshot holds
//! the plots' train blue and val orange, which nothing else on the page uses). `.ci/run`
//! installs Chromium and sets `NANOFLOW_REQUIRE_BROWSER=1`; elsewhere the test says it skipped.

use std::path::Path;
use std::process::Command;

fn chromium() -> Option<&'static str> {
    ["chromium", "chromium-browser", "google-chrome"]
        .into_iter()
        .find(|name| Command::new(name).arg("--version").output().is_ok_and(|output| output.status.success()))
}

/// Pixels within a few levels of `rgb`.
fn count(pixels: &[u8], channels: usize, rgb: [u8; 3]) -> usize {
    pixels
        .chunks(channels)
        .filter(|pixel| pixel.iter().zip(rgb).all(|(&have, want)| (have as i32 - want as i32).abs() <= 6))
        .count()
}

fn decode(path: &Path) -> (Vec<u8>, usize) {
    let decoder = png::Decoder::new(std::io::BufReader::new(fs_err::File::open(path).unwrap()));
    let mut reader = decoder.read_info().unwrap();
    let mut pixels = vec![0; reader.output_buffer_size()];
    let info = reader.next_frame(&mut pixels).unwrap();
    pixels.truncate(info.buffer_size());
    (pixels, info.color_type.samples())
}

#[test]
fn the_report_renders_in_headless_chromium_with_its_plots_and_no_console_errors() {
    let Some(browser) = chromium() else {
        assert!(
            std::env::var_os("NANOFLOW_REQUIRE_BROWSER").is_none(),
            "NANOFLOW_REQUIRE_BROWSER is set, but no chromium is on PATH"
        );
        eprintln!("skipped: no chromium on PATH (apt-get install chromium)");
        return;
    };
    let test = crate::report::test();
    test.expect(&["run", "tiny"], 0);
    test.expect(&["report", "tiny"], 0);
    let page = test.path("reports/tiny/report.html");
    let screenshot = test.path("screenshot.png");
    let output = Command::new(browser)
        .args(["--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars", "--window-size=1000,4000"])
        .args(["--enable-logging=stderr", "--v=0", "--allow-file-access-from-files"])
        .arg(format!("--screenshot={}", screenshot.display()))
        .arg(format!("file://{}", page.display()))
        .env("HOME", test.path(""))
        .output()
        .unwrap();
    let log = String::from_utf8_lossy(&output.stderr);
    assert!(output.status.success(), "{browser} failed:\n{log}");
    let console: Vec<&str> = log.lines().filter(|line| line.contains("CONSOLE")).collect();
    assert!(console.is_empty(), "console messages:\n{}", console.join("\n"));
    let (pixels, channels) = decode(&screenshot);
    // Both plots drawn: the train curves in tab10 blue, the val curves in orange.
    let (blue, orange) = (count(&pixels, channels, [31, 119, 180]), count(&pixels, channels, [255, 127, 14]));
    assert!(blue > 500 && orange > 200, "plots not drawn: {blue} blue and {orange} orange pixels");
}
