//! The machine the figures were measured on, printed before them.

pub fn print() {
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("model name"))
                .and_then(|l| l.split(':').nth(1))
                .map(|m| m.trim().to_owned())
        })
        .unwrap_or_else(|| "unknown".into());
    let cores = std::thread::available_parallelism().map_or(0, |n| n.get());
    let rabbit = cpw_testkit::broker::rabbitmqctl()
        .arg("version")
        .output()
        .ok()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_owned())
        .filter(|v| !v.is_empty())
        .unwrap_or_else(|| "unknown".into());
    println!("machine: {cores} cores, {cpu}; RabbitMQ {rabbit}");
    println!(
        "worker: {} (separate process); simulator: separate process",
        crate::WORKER_BIN
    );
}
