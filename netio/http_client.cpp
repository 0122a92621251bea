#include "netio/http_client.h"

#include <sys/socket.h>

#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstdio>
#include <cstring>
#include <optional>
#include <unordered_map>

namespace netio {

namespace {

constexpr long kRecvBufferBytes = 256 * 1024;   // CURLOPT_BUFFERSIZE (curl caps it at 10 MiB)
constexpr long kSendBufferBytes = 1024 * 1024;  // CURLOPT_UPLOAD_BUFFERSIZE (curl caps it at 2 MiB)
constexpr size_t kMaxPooledEasyHandles = 64;

char ascii_lower(char c) noexcept { return (c >= 'A' && c <= 'Z') ? static_cast<char>(c + ('a' - 'A')) : c; }

bool iequals(std::string_view a, std::string_view b) noexcept {
    if (a.size() != b.size()) return false;
    for (size_t i = 0; i < a.size(); ++i) {
        if (ascii_lower(a[i]) != ascii_lower(b[i])) return false;
    }
    return true;
}

std::string_view trim(std::string_view s) noexcept {
    while (!s.empty() && (s.front() == ' ' || s.front() == '\t')) s.remove_prefix(1);
    while (!s.empty() && (s.back() == ' ' || s.back() == '\t' || s.back() == '\r' || s.back() == '\n')) {
        s.remove_suffix(1);
    }
    return s;
}

// The URL as it may appear in an error message: no userinfo, no query (presigned URLs carry
// signatures there).
std::string redact_url(std::string_view url) {
    const size_t scheme_end = url.find("://");
    const size_t host_start = scheme_end == std::string_view::npos ? 0 : scheme_end + 3;
    const size_t path_start = url.find_first_of("/?#", host_start);
    std::string_view authority = url.substr(host_start, path_start == std::string_view::npos
                                                            ? std::string_view::npos
                                                            : path_start - host_start);
    if (const size_t at = authority.rfind('@'); at != std::string_view::npos) authority.remove_prefix(at + 1);
    std::string out(url.substr(0, host_start));
    out += authority;
    if (path_start != std::string_view::npos) {
        const std::string_view rest = url.substr(path_start);
        const size_t q = rest.find_first_of("?#");
        out += rest.substr(0, q);
        if (q != std::string_view::npos && rest[q] == '?') out += "?...";
    }
    return out;
}

struct EasyDeleter {
    void operator()(CURL* e) const noexcept { curl_easy_cleanup(e); }
};
using EasyPtr = std::unique_ptr<CURL, EasyDeleter>;

struct SlistDeleter {
    void operator()(curl_slist* l) const noexcept { curl_slist_free_all(l); }
};
using SlistPtr = std::unique_ptr<curl_slist, SlistDeleter>;

}  // namespace

std::string find_header(const Headers& headers, std::string_view name) {
    for (auto it = headers.rbegin(); it != headers.rend(); ++it) {
        if (iequals(it->first, name)) return it->second;
    }
    return {};
}

long StringSource::read(std::span<char> buf) noexcept {
    const size_t n = std::min(buf.size(), data_.size() - pos_);
    if (n > 0) std::memcpy(buf.data(), data_.data() + pos_, n);
    pos_ += n;
    return static_cast<long>(n);
}

long FileRangeSource::read(std::span<char> buf) noexcept {
    const uint64_t remaining = length_ - pos_;
    if (remaining == 0) return 0;
    const size_t want = static_cast<size_t>(std::min<uint64_t>(buf.size(), remaining));
    for (;;) {
        const ssize_t r = ::pread(fd_, buf.data(), want, static_cast<off_t>(offset_ + pos_));
        if (r < 0 && errno == EINTR) continue;
        if (r <= 0) return kAbort;  // an error, or the file is shorter than the range
        pos_ += static_cast<uint64_t>(r);
        return static_cast<long>(r);
    }
}

struct HttpClient::Impl {
    struct Transfer {
        Impl* client = nullptr;
        TransferId id = 0;
        std::string method;
        std::string url;
        BodySink* sink = nullptr;
        DoneCallback done;
        std::shared_ptr<BodySource> source;
        uint64_t upload_length = 0;
        uint64_t uploaded = 0;
        size_t max_body_bytes = 0;
        EasyPtr easy;
        SlistPtr header_list;
        std::string range;
        Response resp;
        bool head_delivered = false;
        bool cancel_requested = false;
        bool removed = false;          // no longer in the multi handle
        int recv_buffer_bytes = 0;     // SO_RCVBUF for connections it opens; 0 = default
        std::optional<Error> error;    // set by our callbacks (sink, source, body limit)
        char errbuf[CURL_ERROR_SIZE] = {};

        ~Transfer() { easy.reset(); }  // the handle goes before the buffers and lists it points to

        std::string what() const { return method + " " + redact_url(url); }
        void fail(std::string msg, std::error_code ec = std::make_error_code(std::errc::io_error)) {
            if (!error) error = Error{ec, what() + ": " + msg};
        }
    };

    UringLoop& loop;
    CurlMulti multi;
    std::unordered_map<TransferId, std::unique_ptr<Transfer>> transfers;
    std::vector<EasyPtr> pool;
    TransferId next_id = 1;
    int in_callback = 0;  // > 0 while a sink or source runs inside a curl callback
    bool shut_down = false;
    std::shared_ptr<int> alive = std::make_shared<int>(0);

    explicit Impl(UringLoop& l) : loop(l), multi(l) {}
    ~Impl();

    EasyPtr take_easy();
    void recycle(EasyPtr easy) noexcept;
    std::optional<Error> configure(Transfer& t, Request& req);
    void on_transfer_done(TransferId id, CURLcode rc);
    Result<Response> outcome(Transfer& t, CURLcode rc);
    void finish_cancel(TransferId id);
    bool deliver_head(Transfer& t) noexcept;

    static size_t on_header(char* p, size_t size, size_t n, void* ud) noexcept;
    static size_t on_body(char* p, size_t size, size_t n, void* ud) noexcept;
    static size_t on_upload(char* p, size_t size, size_t n, void* ud) noexcept;
    static int on_seek(void* ud, curl_off_t offset, int origin) noexcept;
    static int on_sockopt(void* ud, curl_socket_t fd, curlsocktype purpose) noexcept;
};

HttpClient::Impl::~Impl() {
    // Abort without callbacks: easy handles leave the multi first, then go; the multi (declared
    // before them) is destroyed last and cleans up the connection cache.
    alive.reset();
    for (auto& [id, t] : transfers) {
        if (!t->removed) multi.remove(t->easy.get());
    }
    transfers.clear();
    pool.clear();
}

int HttpClient::Impl::on_sockopt(void* ud, curl_socket_t fd, curlsocktype purpose) noexcept {
    auto* t = static_cast<Transfer*>(ud);
    if (purpose == CURLSOCKTYPE_IPCXN && t->recv_buffer_bytes > 0)
        (void)::setsockopt(fd, SOL_SOCKET, SO_RCVBUF, &t->recv_buffer_bytes, sizeof t->recv_buffer_bytes);
    return CURL_SOCKOPT_OK;
}

EasyPtr HttpClient::Impl::take_easy() {
    if (!pool.empty()) {
        EasyPtr e = std::move(pool.back());
        pool.pop_back();
        return e;
    }
    return EasyPtr(curl_easy_init());
}

void HttpClient::Impl::recycle(EasyPtr easy) noexcept {
    if (!easy) return;
    // Reset drops every option (and our pointers into the Transfer); the connection cache lives in
    // the multi handle, so reuse of connections does not depend on reusing easy handles.
    curl_easy_reset(easy.get());
    if (pool.size() < kMaxPooledEasyHandles) {
        try {
            pool.push_back(std::move(easy));
        } catch (...) {
        }
    }
}

std::optional<Error> HttpClient::Impl::configure(Transfer& t, Request& req) {
    CURL* e = t.easy.get();
    auto set = [&](CURLoption opt, auto value) -> bool { return curl_easy_setopt(e, opt, value) == CURLE_OK; };

    std::string method = req.method.empty() ? std::string("GET") : req.method;
    for (auto& c : method) c = static_cast<char>((c >= 'a' && c <= 'z') ? c - 32 : c);
    t.method = method;
    t.url = req.url;

    if (!set(CURLOPT_URL, req.url.c_str())) return Error::make(t.what() + ": bad URL", make_error_code(CURLE_URL_MALFORMAT));
    set(CURLOPT_PROTOCOLS_STR, "http,https");
    set(CURLOPT_REDIR_PROTOCOLS_STR, "http,https");
    set(CURLOPT_PRIVATE, static_cast<void*>(&t));
    set(CURLOPT_ERRORBUFFER, t.errbuf);
    set(CURLOPT_NOSIGNAL, 1L);
    // HTTP/1.1 also over TLS: the planner sizes parallel streams per blob as separate TCP
    // connections (HTTP/2 would multiplex them onto one), and pausing (back-pressure) is what
    // NETIO-RECIPE.md verified on HTTP/1.1.
    set(CURLOPT_HTTP_VERSION, static_cast<long>(CURL_HTTP_VERSION_1_1));
    set(CURLOPT_TCP_NODELAY, 1L);
    set(CURLOPT_TCP_KEEPALIVE, 1L);
    set(CURLOPT_BUFFERSIZE, kRecvBufferBytes);
    set(CURLOPT_UPLOAD_BUFFERSIZE, kSendBufferBytes);
    t.recv_buffer_bytes = req.socket_recv_buffer_bytes;
    if (t.recv_buffer_bytes > 0) {
        set(CURLOPT_SOCKOPTFUNCTION, &Impl::on_sockopt);
        set(CURLOPT_SOCKOPTDATA, static_cast<void*>(&t));
    }

    set(CURLOPT_HEADERFUNCTION, &Impl::on_header);
    set(CURLOPT_HEADERDATA, static_cast<void*>(&t));
    set(CURLOPT_WRITEFUNCTION, &Impl::on_body);
    set(CURLOPT_WRITEDATA, static_cast<void*>(&t));

    // curl drops Authorization (and cookies) when a redirect goes to another host unless
    // CURLOPT_UNRESTRICTED_AUTH is set, which it is not.
    set(CURLOPT_FOLLOWLOCATION, req.follow_redirects ? 1L : 0L);
    set(CURLOPT_MAXREDIRS, static_cast<long>(req.max_redirects));

    if (req.timeout_ms > 0) set(CURLOPT_TIMEOUT_MS, req.timeout_ms);
    if (req.connect_timeout_ms > 0) set(CURLOPT_CONNECTTIMEOUT_MS, req.connect_timeout_ms);
    if (req.low_speed_time_s > 0) {
        set(CURLOPT_LOW_SPEED_LIMIT, 1L);
        set(CURLOPT_LOW_SPEED_TIME, req.low_speed_time_s);
    }

    set(CURLOPT_SSL_VERIFYPEER, req.tls.verify ? 1L : 0L);
    set(CURLOPT_SSL_VERIFYHOST, req.tls.verify ? 2L : 0L);
    if (!req.tls.ca_file.empty()) set(CURLOPT_CAINFO, req.tls.ca_file.c_str());

    if (req.range) {
        if (req.range->last < req.range->first) return Error::make(t.what() + ": empty byte range", std::make_error_code(std::errc::invalid_argument));
        t.range = std::to_string(req.range->first) + "-" + std::to_string(req.range->last);
        set(CURLOPT_RANGE, t.range.c_str());
    }

    curl_slist* list = nullptr;
    auto append = [&](const std::string& line) -> bool {
        curl_slist* n = curl_slist_append(list, line.c_str());
        if (!n) return false;
        list = n;
        return true;
    };
    bool ok = true;
    bool user_expect = false;
    for (const auto& [name, value] : req.headers) {
        if (iequals(name, "Expect")) user_expect = true;
        // "Name;" is curl's syntax for a header with an empty value ("Name:" would remove it).
        ok = ok && append(value.empty() ? name + ";" : name + ": " + value);
    }

    const bool has_body = req.body_source || !req.body.empty() || method == "POST" || method == "PUT" ||
                          method == "PATCH";
    if (method == "HEAD") {
        set(CURLOPT_NOBODY, 1L);
    } else if (has_body) {
        t.source = req.body_source ? std::move(req.body_source) : std::make_shared<StringSource>(std::move(req.body));
        t.upload_length = t.source->length();
        // UPLOAD with a known size: curl sends Content-Length (0 included), never chunked. The
        // method is whatever CUSTOMREQUEST says; redirects rewind through SEEKFUNCTION.
        set(CURLOPT_UPLOAD, 1L);
        set(CURLOPT_INFILESIZE_LARGE, static_cast<curl_off_t>(t.upload_length));
        set(CURLOPT_READFUNCTION, &Impl::on_upload);
        set(CURLOPT_READDATA, static_cast<void*>(&t));
        set(CURLOPT_SEEKFUNCTION, &Impl::on_seek);
        set(CURLOPT_SEEKDATA, static_cast<void*>(&t));
        if (method != "PUT") set(CURLOPT_CUSTOMREQUEST, method.c_str());
        // curl adds "Expect: 100-continue" to uploads over 1 MiB; that costs a round trip (or a
        // 1 s wait) per request, so the empty header turns it off.
        if (!user_expect) ok = ok && append("Expect:");
    } else {
        set(CURLOPT_HTTPGET, 1L);
        if (method != "GET") set(CURLOPT_CUSTOMREQUEST, method.c_str());
    }
    t.header_list.reset(list);
    if (!ok) return Error::make(t.what() + ": out of memory", std::make_error_code(std::errc::not_enough_memory));
    if (list) set(CURLOPT_HTTPHEADER, list);
    return std::nullopt;
}

bool HttpClient::Impl::deliver_head(Transfer& t) noexcept {
    if (t.head_delivered) return true;
    t.head_delivered = true;
    long status = 0;
    curl_easy_getinfo(t.easy.get(), CURLINFO_RESPONSE_CODE, &status);
    t.resp.status = status;
    if (t.sink) {
        ++in_callback;
        const bool ok = t.sink->on_response_head(status, t.resp.headers);
        --in_callback;
        if (!ok) {
            t.fail("response (status " + std::to_string(status) + ") rejected by the body sink");
            return false;
        }
    } else {
        curl_off_t length = -1;
        curl_easy_getinfo(t.easy.get(), CURLINFO_CONTENT_LENGTH_DOWNLOAD_T, &length);
        if (length > 0) {
            try {
                t.resp.body.reserve(static_cast<size_t>(std::min<curl_off_t>(length, static_cast<curl_off_t>(t.max_body_bytes))));
            } catch (...) {
            }
        }
    }
    return true;
}

size_t HttpClient::Impl::on_header(char* p, size_t size, size_t n, void* ud) noexcept {
    auto& t = *static_cast<Transfer*>(ud);
    const size_t len = size * n;
    std::string_view line(p, len);
    if (line.size() >= 5 && line.substr(0, 5) == "HTTP/") {
        // A new response (1xx, a redirect hop, a proxy's CONNECT reply): only the final one's
        // headers are kept.
        t.resp.headers.clear();
        return len;
    }
    if (t.head_delivered) return len;  // trailers
    line = trim(line);
    if (line.empty()) return len;
    try {
        if ((p[0] == ' ' || p[0] == '\t') && !t.resp.headers.empty()) {  // obsolete line folding
            auto& v = t.resp.headers.back().second;
            v += ' ';
            v += line;
            return len;
        }
        const size_t colon = line.find(':');
        if (colon == std::string_view::npos) return len;
        t.resp.headers.emplace_back(std::string(trim(line.substr(0, colon))), std::string(trim(line.substr(colon + 1))));
    } catch (...) {
        return 0;  // out of memory -> CURLE_WRITE_ERROR
    }
    return len;
}

size_t HttpClient::Impl::on_body(char* p, size_t size, size_t n, void* ud) noexcept {
    auto& t = *static_cast<Transfer*>(ud);
    Impl& c = *t.client;
    const size_t len = size * n;
    if (t.cancel_requested) return 0;
    // curl ignores the bodies of redirects it follows, so the first body byte belongs to the
    // final response.
    if (!t.head_delivered && !c.deliver_head(t)) return 0;
    if (t.cancel_requested) return 0;
    if (t.sink) {
        ++c.in_callback;
        const Offer o = t.sink->offer({p, len});
        --c.in_callback;
        switch (o) {
        case Offer::taken:
            t.resp.body_bytes += len;
            return len;
        case Offer::full:
            return CURL_WRITEFUNC_PAUSE;  // consumed nothing; curl delivers it again on resume
        case Offer::error:
            t.fail("aborted by the body sink");
            return 0;
        }
        return 0;
    }
    if (t.resp.body.size() + len > t.max_body_bytes) {
        t.fail("response body exceeds the limit of " + std::to_string(t.max_body_bytes) + " bytes",
               std::make_error_code(std::errc::value_too_large));
        return 0;
    }
    try {
        t.resp.body.append(p, len);
    } catch (...) {
        t.fail("out of memory", std::make_error_code(std::errc::not_enough_memory));
        return 0;
    }
    t.resp.body_bytes += len;
    return len;
}

size_t HttpClient::Impl::on_upload(char* p, size_t size, size_t n, void* ud) noexcept {
    auto& t = *static_cast<Transfer*>(ud);
    Impl& c = *t.client;
    if (t.cancel_requested) return CURL_READFUNC_ABORT;
    const uint64_t remaining = t.upload_length - t.uploaded;
    if (remaining == 0) return 0;
    const size_t want = static_cast<size_t>(std::min<uint64_t>(size * n, remaining));
    ++c.in_callback;
    const long r = t.source->read({p, want});
    --c.in_callback;
    if (t.cancel_requested) return CURL_READFUNC_ABORT;
    if (r == BodySource::kPause) return CURL_READFUNC_PAUSE;
    if (r < 0) {
        t.fail("request body source failed");
        return CURL_READFUNC_ABORT;
    }
    if (r == 0 || static_cast<size_t>(r) > want) {
        t.fail("request body source gave " + std::to_string(t.uploaded) + " of " +
               std::to_string(t.upload_length) + " bytes");
        return CURL_READFUNC_ABORT;
    }
    t.uploaded += static_cast<uint64_t>(r);
    return static_cast<size_t>(r);
}

int HttpClient::Impl::on_seek(void* ud, curl_off_t offset, int origin) noexcept {
    // curl rewinds the body for a redirect, or to retry on a reused connection that had died.
    auto& t = *static_cast<Transfer*>(ud);
    if (origin != SEEK_SET || offset != 0) return CURL_SEEKFUNC_CANTSEEK;
    ++t.client->in_callback;
    const bool ok = t.source->rewind();
    --t.client->in_callback;
    if (!ok) return CURL_SEEKFUNC_CANTSEEK;
    t.uploaded = 0;
    return CURL_SEEKFUNC_OK;
}

Result<Response> HttpClient::Impl::outcome(Transfer& t, CURLcode rc) {
    if (t.cancel_requested) return Error::make(t.what() + ": cancelled", std::make_error_code(std::errc::operation_canceled));
    if (rc != CURLE_OK) {
        if (t.error) return std::move(*t.error);
        std::string msg = t.what() + ": " + curl_easy_strerror(rc);
        if (t.errbuf[0] != '\0') {
            std::string_view detail(t.errbuf);
            while (!detail.empty() && detail.back() == '\n') detail.remove_suffix(1);
            msg += " (";
            msg += detail;
            msg += ")";
        }
        return Error{make_error_code(rc), std::move(msg)};
    }
    if (!t.head_delivered && !deliver_head(t)) return std::move(*t.error);
    long status = 0;
    curl_easy_getinfo(t.easy.get(), CURLINFO_RESPONSE_CODE, &status);
    t.resp.status = status;
    const char* effective = nullptr;
    curl_easy_getinfo(t.easy.get(), CURLINFO_EFFECTIVE_URL, &effective);
    t.resp.effective_url = effective ? effective : t.url;
    return std::move(t.resp);
}

void HttpClient::Impl::on_transfer_done(TransferId id, CURLcode rc) {
    auto it = transfers.find(id);
    if (it == transfers.end()) return;
    std::unique_ptr<Transfer> t = std::move(it->second);
    transfers.erase(it);
    t->removed = true;
    Result<Response> r = outcome(*t, rc);
    DoneCallback done = std::move(t->done);
    recycle(std::move(t->easy));
    t.reset();  // releases the body source before the callback runs
    if (done) done(std::move(r));
}

void HttpClient::Impl::finish_cancel(TransferId id) {
    auto it = transfers.find(id);
    if (it == transfers.end()) return;  // finished meanwhile (and reported as cancelled)
    std::unique_ptr<Transfer> t = std::move(it->second);
    transfers.erase(it);
    if (!t->removed) multi.remove(t->easy.get());
    Result<Response> r = Error::make(t->what() + ": cancelled", std::make_error_code(std::errc::operation_canceled));
    DoneCallback done = std::move(t->done);
    recycle(std::move(t->easy));
    t.reset();
    if (done) done(std::move(r));
}

HttpClient::HttpClient(UringLoop& loop) : impl_(std::make_unique<Impl>(loop)) {}

HttpClient::~HttpClient() = default;

TransferId HttpClient::start(Request req, BodySink* sink, DoneCallback done) {
    auto& d = *impl_;
    const TransferId id = d.next_id++;
    auto t = std::make_unique<Impl::Transfer>();
    t->client = &d;
    t->id = id;
    t->sink = sink;
    t->done = std::move(done);
    t->max_body_bytes = req.max_body_bytes;
    t->method = req.method;
    t->url = req.url;
    t->easy = d.take_easy();

    std::optional<Error> err;
    if (d.shut_down) {
        err = Error::make(t->what() + ": cancelled (the client is shutting down)",
                          std::make_error_code(std::errc::operation_canceled));
    } else if (!t->easy) {
        err = Error::make(t->what() + ": curl_easy_init failed", std::make_error_code(std::errc::not_enough_memory));
    } else {
        err = d.configure(*t, req);
    }
    if (err) {
        // done never runs inside start().
        d.recycle(std::move(t->easy));
        d.loop.defer([token = std::weak_ptr<int>(d.alive), cb = std::move(t->done), e = std::move(*err)]() mutable {
            if (!token.expired() && cb) cb(std::move(e));
        });
        return id;
    }
    CURL* easy = t->easy.get();
    auto resumer = [this, id, token = std::weak_ptr<int>(d.alive)] {
        if (!token.expired()) resume(id);
    };
    if (t->source) t->source->attach(resumer);
    if (t->sink) t->sink->attach(resumer);
    d.transfers.emplace(id, std::move(t));
    // CurlMulti runs on_done from the loop's queue, never from here.
    d.multi.add(easy, [&d, id](CURLcode rc) { d.on_transfer_done(id, rc); });
    return id;
}

void HttpClient::resume(TransferId id) {
    auto& d = *impl_;
    auto it = d.transfers.find(id);
    if (it == d.transfers.end() || it->second->removed) return;
    d.multi.resume(it->second->easy.get());
}

void HttpClient::cancel(TransferId id) {
    auto& d = *impl_;
    auto it = d.transfers.find(id);
    if (it == d.transfers.end()) return;
    Impl::Transfer& t = *it->second;
    if (t.cancel_requested) return;
    t.cancel_requested = true;
    if (d.in_callback == 0) {
        // Stop the transfer now; from inside a sink or source (i.e. inside curl) the multi cannot
        // be re-entered, so there the callbacks abort it and the queued step below removes it.
        d.multi.remove(t.easy.get());
        t.removed = true;
    }
    d.loop.defer([&d, id, token = std::weak_ptr<int>(d.alive)] {
        if (!token.expired()) d.finish_cancel(id);
    });
}

void HttpClient::shutdown() {
    auto& d = *impl_;
    d.shut_down = true;
    std::vector<TransferId> ids;
    ids.reserve(d.transfers.size());
    for (const auto& [id, t] : d.transfers) ids.push_back(id);
    for (TransferId id : ids) cancel(id);
}

size_t HttpClient::active() const noexcept { return impl_->transfers.size(); }

UringLoop& HttpClient::loop() noexcept { return impl_->loop; }

}  // namespace netio
