//! Runs the local fake of Anthropic's Messages API until killed, for trying
//! the real `claude` CLI by hand: `fake-anthropic edit <file> <content>`,
//! `fake-anthropic endless`, or `fake-anthropic fail <status>`. Prints the
//! base URL to use as `ANTHROPIC_BASE_URL`.

use tests::fake_anthropic::{FakeAnthropic, Scenario};

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let scenario = match args.first().map(String::as_str) {
        Some("endless") => Scenario::EndlessEdits,
        Some("fail") => Scenario::Fail(args.get(1).and_then(|s| s.parse().ok()).unwrap_or(500)),
        _ => Scenario::EditFile {
            path: args.get(1).cloned().unwrap_or_else(|| "hello.txt".into()),
            content: args
                .get(2)
                .cloned()
                .unwrap_or_else(|| "hello from the fake API\n".into()),
        },
    };
    let api = FakeAnthropic::start(scenario);
    println!("{}", api.base_url());
    loop {
        std::thread::sleep(std::time::Duration::from_secs(3600));
    }
}
