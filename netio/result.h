// Result<T>: a value or an Error, shaped like std::expected (gcc 12 has it only in C++23).
// The data path returns these instead of throwing.
#pragma once

#include <string>
#include <system_error>
#include <utility>
#include <variant>

namespace netio {

struct Error {
    std::error_code code;   // errno, curl_category() or engine codes
    std::string message;    // human-readable, never contains credentials

    static Error make(std::string msg, std::error_code ec = std::make_error_code(std::errc::io_error)) {
        return Error{ec, std::move(msg)};
    }
};

template <class T>
class [[nodiscard]] Result {
public:
    Result(T v) : v_(std::in_place_index<0>, std::move(v)) {}
    Result(Error e) : v_(std::in_place_index<1>, std::move(e)) {}

    bool ok() const noexcept { return v_.index() == 0; }
    explicit operator bool() const noexcept { return ok(); }
    T& value() & { return std::get<0>(v_); }
    T&& value() && { return std::get<0>(std::move(v_)); }
    const T& value() const& { return std::get<0>(v_); }
    T& operator*() & { return value(); }
    T* operator->() { return &std::get<0>(v_); }
    const T* operator->() const { return &std::get<0>(v_); }
    const Error& error() const { return std::get<1>(v_); }

private:
    std::variant<T, Error> v_;
};

struct Unit {};
using Status = Result<Unit>;
inline Status ok_status() { return Status(Unit{}); }

}  // namespace netio
