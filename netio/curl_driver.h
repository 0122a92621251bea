// CurlMulti: a libcurl multi handle driven by a UringLoop, per NETIO-RECIPE.md:
// CURLMOPT_SOCKETFUNCTION arms one-shot polls in a slot table keyed by socket,
// CURLMOPT_TIMERFUNCTION sets a loop timer, completions call curl_multi_socket_action,
// finished transfers are drained with curl_multi_info_read. No curl_multi_perform loop.
//
// Threading: loop thread only. Ownership: CurlMulti borrows the easy handles it is given; the
// caller owns them and must not free one before its on_done ran or remove() returned.
// Shutdown order (destructor): easy handles removed, curl_multi_cleanup, remaining polls
// cancelled; the loop must outlive this object.
#pragma once

#include <curl/curl.h>

#include <functional>
#include <memory>
#include <system_error>

#include "netio/uring_loop.h"

namespace netio {

const std::error_category& curl_category() noexcept;
inline std::error_code make_error_code(CURLcode c) noexcept {
    return {static_cast<int>(c), curl_category()};
}

class CurlMulti {
public:
    using DoneCallback = std::function<void(CURLcode)>;

    explicit CurlMulti(UringLoop& loop);
    ~CurlMulti();
    CurlMulti(const CurlMulti&) = delete;
    CurlMulti& operator=(const CurlMulti&) = delete;

    // Starts `easy`; `on_done(result)` runs from the loop's deferred queue once it finished. The
    // handle is already removed from the multi when on_done runs, so on_done may free or reuse it.
    void add(CURL* easy, DoneCallback on_done);
    // Aborts a running transfer; on_done is not called.
    void remove(CURL* easy) noexcept;
    // Un-pauses a transfer paused by CURL_WRITEFUNC_PAUSE / CURL_READFUNC_PAUSE. Deferred to the
    // loop's queue (never run from inside a curl callback).
    void resume(CURL* easy);

    size_t running() const noexcept;
    UringLoop& loop() noexcept;

private:
    struct Impl;
    std::unique_ptr<Impl> impl_;
};

}  // namespace netio
