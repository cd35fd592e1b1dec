//! Test support, never shipped: a tiny HTTP/1.1 server on 127.0.0.1 for the download and Hub
//! tests (the stages crate's and the CLI's): plain `std::net` and a thread per connection,
//! serving fixed bodies with `Range`/`If-Range` support, extra headers per route (the Hub's
//! `etag` and `x-repo-commit`), and connections that break part-way on purpose.
//! Every request is logged so tests can assert what the client asked for.

use std::collections::HashMap;
use std::io::{BufRead, BufReader, Write};
use std::net::{TcpListener, TcpStream};
use std::sync::{Arc, Mutex};

/// What the server answers at one path.
#[derive(Debug, Clone, Default)]
pub struct Route {
    pub body: Vec<u8>,
    pub headers: Vec<(String, String)>,
    /// The next this many answers send only `break_after` bytes of the body, then hang up.
    pub breaks: usize,
    pub break_after: usize,
    /// Answer with this status and no body (e.g. 503), this many times, before serving normally.
    pub failures: usize,
    /// Answer `302 Found` to this `Location` (with the route's headers), as the Hub does for a
    /// file on its CDN.
    pub redirect: Option<String>,
}

impl Route {
    pub fn new(body: impl Into<Vec<u8>>) -> Route {
        Route { body: body.into(), ..Route::default() }
    }

    pub fn header(mut self, name: &str, value: &str) -> Route {
        self.headers.push((name.into(), value.into()));
        self
    }
}

/// One request as the server saw it: `GET /path`, then its headers lowercased.
#[derive(Debug, Clone)]
pub struct Request {
    pub path: String,
    pub headers: HashMap<String, String>,
}

#[derive(Clone)]
pub struct Server {
    pub url: String,
    routes: Arc<Mutex<HashMap<String, Route>>>,
    log: Arc<Mutex<Vec<Request>>>,
}

impl Server {
    pub fn start() -> Server {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        let server = Server { url, routes: Arc::default(), log: Arc::default() };
        let handle = server.clone();
        std::thread::spawn(move || {
            for stream in listener.incoming().flatten() {
                let handle = handle.clone();
                std::thread::spawn(move || handle.serve(stream));
            }
        });
        server
    }

    pub fn route(&self, path: &str, route: Route) {
        self.routes.lock().unwrap().insert(path.into(), route);
    }

    pub fn requests(&self) -> Vec<Request> {
        self.log.lock().unwrap().clone()
    }

    fn serve(&self, stream: TcpStream) {
        let mut reader = BufReader::new(stream.try_clone().unwrap());
        let mut line = String::new();
        if reader.read_line(&mut line).is_err() || line.is_empty() {
            return;
        }
        let path = line.split_whitespace().nth(1).unwrap_or_default().to_string();
        let mut headers = HashMap::new();
        loop {
            let mut header = String::new();
            if reader.read_line(&mut header).is_err() || header.trim().is_empty() {
                break;
            }
            if let Some((name, value)) = header.split_once(':') {
                headers.insert(name.trim().to_ascii_lowercase(), value.trim().to_string());
            }
        }
        self.log.lock().unwrap().push(Request { path: path.clone(), headers: headers.clone() });
        let route = {
            let mut routes = self.routes.lock().unwrap();
            let Some(route) = routes.get_mut(path.split('?').next().unwrap()) else {
                return respond(stream, "404 Not Found", &[], b"not found", None);
            };
            let snapshot = route.clone();
            route.failures = route.failures.saturating_sub(1);
            if route.failures == snapshot.failures {
                route.breaks = route.breaks.saturating_sub(1);
            }
            snapshot
        };
        if route.failures > 0 {
            return respond(stream, "503 Service Unavailable", &[], b"", None);
        }
        if let Some(location) = &route.redirect {
            let mut headers = route.headers.clone();
            headers.push(("Location".into(), location.clone()));
            return respond(stream, "302 Found", &headers, b"", None);
        }
        let length = route.body.len();
        let etag = route.headers.iter().find(|(name, _)| name.eq_ignore_ascii_case("etag")).map(|(_, v)| v);
        let if_range_ok = headers.get("if-range").is_none_or(|validator| Some(validator) == etag);
        let range = headers
            .get("range")
            .filter(|_| if_range_ok)
            .and_then(|range| range.strip_prefix("bytes="))
            .and_then(|range| range.split_once('-'))
            .map(|(first, last)| {
                let first: usize = first.parse().unwrap();
                let last = last.parse().unwrap_or(length.saturating_sub(1)).min(length.saturating_sub(1));
                (first, last)
            });
        let mut extra = route.headers.clone();
        let (status, body) = match range {
            Some((first, _)) if first >= length => {
                extra.push(("Content-Range".into(), format!("bytes */{length}")));
                ("416 Range Not Satisfiable", &[][..])
            }
            Some((first, last)) => {
                extra.push(("Content-Range".into(), format!("bytes {first}-{last}/{length}")));
                ("206 Partial Content", &route.body[first..=last])
            }
            None => ("200 OK", &route.body[..]),
        };
        let cut = (route.breaks > 0).then_some(route.break_after);
        respond(stream, status, &extra, body, cut);
    }
}

/// Writes a response with the full `Content-Length`, then `cut` bytes of the body at most.
fn respond(mut stream: TcpStream, status: &str, headers: &[(String, String)], body: &[u8], cut: Option<usize>) {
    let mut head = format!("HTTP/1.1 {status}\r\nContent-Length: {}\r\nConnection: close\r\n", body.len());
    for (name, value) in headers {
        head.push_str(&format!("{name}: {value}\r\n"));
    }
    head.push_str("\r\n");
    let body = &body[..cut.unwrap_or(body.len()).min(body.len())];
    let _ = stream.write_all(head.as_bytes()).and_then(|()| stream.write_all(body));
    let _ = stream.flush();
    let _ = stream.shutdown(std::net::Shutdown::Both);
}
