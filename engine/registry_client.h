// RegistryClient: the OCI distribution API of one registry, as coroutines on the loop.
//
// Auth: anonymous, Basic, or Bearer token challenges (realm/service/scope); tokens cached per scope
// and fetched again on a 401. Transport: https with verification by default; `insecure` allows plain
// http (tried when TLS fails) and skips verification. Retries: connection errors, 408/5xx with
// exponential backoff and full jitter; 429 honours Retry-After. Registry error bodies
// ({"errors":[{code,message,detail}]}) become the message of the returned Error.
// Credentials never appear in an Error message or a log line.
//
// Threading: loop thread only. Ownership: borrows the HttpClient, which must outlive it.
#pragma once

#include <coroutine>
#include <cstdint>
#include <deque>
#include <functional>
#include <map>
#include <memory>
#include <optional>
#include <string>
#include <vector>

#include "engine/auth_parse.h"
#include "netio/http_client.h"
#include "netio/result.h"
#include "netio/task.h"
#include "planner/backoff.h"
#include "planner/registry_budget.h"

namespace engine {

using netio::Result;
using netio::Status;
using netio::Task;

struct RegistryOptions {
    std::string host;                        // "host[:port]"
    bool insecure = false;                   // allow plain http, skip TLS verification
    std::string scheme;                      // "http" or "https" to use only that; "" = https (then http if insecure)
    std::string ca_file;                     // extra CA bundle
    std::optional<Credentials> credentials;  // from flags or a docker config file
    planner::BackoffPolicy backoff{};
    long request_timeout_ms = 300000;        // manifests, HEADs, small requests
    uint64_t chunk_size_bytes = 64u << 20;   // PATCH chunk size for uploads above it
    unsigned max_connections = 64;           // requests in flight to this registry; 0 = no cap
    double max_requests_per_s = 0;           // request-rate budget; 0 = none until a 429 sets one
    int socket_recv_buffer_bytes = 0;        // SO_RCVBUF of its connections (rate-capped downloads); 0 = default
};

struct ManifestHead {
    std::string digest;
    std::string media_type;
    uint64_t size = 0;
};

struct ManifestData {
    std::string bytes;
    std::string media_type;
    std::string digest;  // sha256 of bytes (checked against Docker-Content-Digest / the requested digest)
};

// Produces the body of [offset, offset+length) of a blob; called again for every retry.
using BlobBodyFactory = std::function<std::shared_ptr<netio::BodySource>(uint64_t offset, uint64_t length)>;

class RegistryClient {
public:
    RegistryClient(netio::HttpClient& http, RegistryOptions opts);

    const std::string& host() const noexcept { return opts_.host; }
    netio::UringLoop& loop() noexcept { return http_.loop(); }

    // GET /v2/: picks the scheme and learns the auth scheme. Must succeed before anything else.
    Task<Status> ping();
    // Every repository (follows Link pagination).
    Task<Result<std::vector<std::string>>> catalog();
    // Every tag of a repository (follows Link pagination); a missing repository gives an empty list.
    Task<Result<std::vector<std::string>>> tags(std::string repo);
    // nullopt when the registry answers 404 (unknown manifest or repository).
    Task<Result<std::optional<ManifestHead>>> head_manifest(std::string repo, std::string reference);
    Task<Result<std::optional<ManifestData>>> get_manifest(std::string repo, std::string reference);
    // PUT exactly these bytes; checks the registry's Docker-Content-Digest against sha256(bytes).
    Task<Status> put_manifest(std::string repo, std::string reference, std::string bytes, std::string media_type);
    Task<Status> delete_manifest(std::string repo, std::string digest);
    // DELETE a blob's link from a repository (the registry reclaims the bytes at garbage collection).
    // 404 counts as done. A registry that refuses deletes (distribution without
    // storage.delete.enabled answers 405 UNSUPPORTED) gives std::errc::operation_not_supported.
    // Bearer scope "repository:<repo>:*": distribution 2.x requires the "*" action for DELETE.
    Task<Status> delete_blob(std::string repo, std::string digest);
    // Size of the blob if the repository has it, nullopt on 404.
    Task<Result<std::optional<uint64_t>>> head_blob(std::string repo, std::string digest);
    // Streams the blob (optionally a range) into `sink`. The Response carries status and headers.
    Task<Result<netio::Response>> get_blob(std::string repo, std::string digest, netio::BodySink* sink,
                                           std::optional<netio::ByteRange> range = std::nullopt);
    // Cross-repository mount from `from_repo`: true when mounted, false when the registry refused
    // (202 session cancelled, 401, 403, 404: the caller uploads instead).
    Task<Result<bool>> mount_blob(std::string repo, std::string digest, std::string from_repo);
    // Awaited before an upload is finalised (the PUT with ?digest=): the blob's sha256 must be
    // verified by then. An error aborts the upload and cancels the session.
    using Finalizable = std::function<Task<Status>()>;
    // POST + PUT (monolithic, blobs up to chunk_size_bytes) or POST + PATCH chunks in order + PUT,
    // with retries from a fresh session. The body may still be arriving (a source that pauses until
    // its bytes are there): chunks stream as they come, and `ready` is awaited before the final
    // PUT (before the only PUT of a monolithic upload). A session cut mid-way is resumed from the
    // offset the registry reports where it allows that, otherwise restarted. `still_arriving`: the
    // body is still being downloaded, so a blob above kStreamMinBytes goes as PATCH chunks even when
    // it fits one chunk (one PUT would have to wait for the verdict before sending a byte).
    Task<Status> upload_blob(std::string repo, std::string digest, uint64_t size, BlobBodyFactory body,
                             Finalizable ready = {}, bool still_arriving = false);

    // The base URL in use after ping(), e.g. "https://host:port".
    const std::string& base_url() const noexcept { return base_url_; }

private:
    // One GET /v2/ at `base` ("scheme://host"), its result into *out; for ping()'s probes.
    Task<void> probe(std::string base, bool retry, std::optional<Result<netio::Response>>* out, netio::WaitGroup* wg);
    Task<Result<netio::Response>> send(netio::Request req, std::vector<std::string> scopes,
                                       netio::BodySink* sink = nullptr, bool retry = true);
    Task<Result<netio::Response>> send_once(netio::Request& req, const std::vector<std::string>& scopes,
                                            netio::BodySink* sink);
    Task<Status> authenticate(const std::string& challenge_header, const std::vector<std::string>& scopes);
    Task<Status> fetch_token(std::string key, std::vector<std::string> scopes);
    Task<Status> upload_once(const std::string& repo, const std::string& digest, uint64_t size,
                             const BlobBodyFactory& body, const Finalizable& ready, bool allow_chunked,
                             bool still_arriving);
    Task<Status> upload_on_session(std::string& loc, bool& closed, const std::string& what,
                                   const std::vector<std::string>& scopes, const std::string& digest, uint64_t size,
                                   uint64_t chunk, const BlobBodyFactory& body, const Finalizable& ready,
                                   bool allow_chunked, bool still_arriving);
    Task<Status> await_ready(const Finalizable& ready);
    Task<void> cancel_upload(std::string session, std::vector<std::string> scopes);
    Task<Result<std::vector<std::string>>> paginate(std::string path, std::string json_key,
                                                     std::vector<std::string> scopes);
    // The registry's connection and request-rate budget (planner::RegistryBudget): a 429 slows the
    // whole registry down instead of failing the request.
    Task<void> acquire_slot();
    void release_slot();
    netio::Request make_request(std::string method, std::string url) const;
    std::string url(const std::string& path) const { return base_url_ + path; }
    std::string resolve_location(const netio::Response& r, const std::string& request_url) const;
    netio::Error describe(const std::string& what, const netio::Response& r) const;

    netio::HttpClient& http_;
    RegistryOptions opts_;
    std::string base_url_;
    std::string auth_scheme_;                       // "", "basic", "bearer"
    std::map<std::string, std::string> challenge_;  // bearer params from the last challenge
    std::map<std::string, std::string> tokens_;     // scope key -> bearer token
    std::map<std::string, std::shared_ptr<netio::Flight>> token_flights_;  // scope key -> fetch in flight
    planner::Backoff backoff_;
    planner::RegistryBudget budget_;
    std::deque<std::coroutine_handle<>> slot_waiters_;
};

}  // namespace engine
