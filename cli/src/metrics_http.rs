//! `--metrics-addr`: serves the host's metrics snapshot as Prometheus text at `/metrics`.

use std::sync::{Arc, Mutex};

use plugbus::host::MetricsSnapshot;

/// Starts the server if an address is given; the returned snapshot is what it serves (the tick
/// loop refreshes it).
pub fn serve(addr: Option<&str>) -> Result<Option<Arc<Mutex<MetricsSnapshot>>>, String> {
    let Some(addr) = addr else { return Ok(None) };
    let server = tiny_http::Server::http(addr).map_err(|e| format!("cannot listen on {addr}: {e}"))?;
    let shared = Arc::new(Mutex::new(MetricsSnapshot::default()));
    let snapshot = Arc::clone(&shared);
    std::thread::Builder::new()
        .name("plugbus-metrics".into())
        .spawn(move || {
            for request in server.incoming_requests() {
                let response = if request.url() == "/metrics" {
                    let body = snapshot.lock().map(|s| s.to_prometheus()).unwrap_or_default();
                    let header = tiny_http::Header::from_bytes(
                        &b"Content-Type"[..],
                        &b"application/openmetrics-text; version=1.0.0; charset=utf-8"[..],
                    )
                    .expect("static header");
                    tiny_http::Response::from_string(body).with_header(header)
                } else {
                    tiny_http::Response::from_string("see /metrics\n").with_status_code(404)
                };
                let _ = request.respond(response);
            }
        })
        .map_err(|e| e.to_string())?;
    eprintln!("metrics at http://{addr}/metrics");
    Ok(Some(shared))
}
