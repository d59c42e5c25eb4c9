// actsim::util::SmallVector<T, N> — a vector of trivially copyable values that keeps its first N
// elements inline (no heap allocation) and spills to the heap past them, so nothing is limited.
// The graph's small lists (a tensor's shape and strides, an op's inputs, outputs, saved list...)
// are mostly 1-4 long: one heap allocation each was ~45% of what `plan` still spent (issue 9).
//
//   util::SmallVector<int64_t, 4> dims{8, 1024, 1600};   // inline
//   dims.push_back(2); dims.push_back(3);                  // 5 > 4: moves to the heap
//   std::vector<int64_t> v = dims;                         // converts both ways
//
// The interface is std::vector's as the code uses it (size, [], iterators as pointers, push_back,
// insert, erase, assign, resize, ==, <=>, initializer lists, conversion from and to std::vector).
#pragma once

#include <algorithm>
#include <compare>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <initializer_list>
#include <iterator>
#include <new>
#include <stdexcept>
#include <type_traits>
#include <vector>

namespace actsim::util {

template <typename T, uint32_t N>
class SmallVector {
  static_assert(std::is_trivially_copyable_v<T> && std::is_trivially_destructible_v<T>,
                "SmallVector copies its elements as bytes");
  static_assert(N >= 1);

 public:
  using value_type = T;
  using size_type = size_t;
  using difference_type = std::ptrdiff_t;
  using reference = T&;
  using const_reference = const T&;
  using pointer = T*;
  using const_pointer = const T*;
  using iterator = T*;
  using const_iterator = const T*;
  using reverse_iterator = std::reverse_iterator<iterator>;
  using const_reverse_iterator = std::reverse_iterator<const_iterator>;

  SmallVector() noexcept {}
  SmallVector(std::initializer_list<T> xs) { append(xs.begin(), xs.size()); }
  explicit SmallVector(size_t n) { resize(n); }
  SmallVector(size_t n, const T& v) { assign(n, v); }
  template <typename It>
    requires(!std::is_integral_v<It>)
  SmallVector(It first, It last) { assign(first, last); }
  SmallVector(const std::vector<T>& v) { append(v.data(), v.size()); }  // NOLINT: drop-in
  SmallVector(const SmallVector& o) {
    if (o.size_ <= N) copy_small(o);
    else append(o.data(), o.size());
  }
  SmallVector(SmallVector&& o) noexcept { steal(o); }
  ~SmallVector() { release(); }

  SmallVector& operator=(const SmallVector& o) {
    if (this == &o) return *this;
    size_ = 0;
    if (o.size_ <= N) copy_small(o);
    else append(o.data(), o.size());
    return *this;
  }
  SmallVector& operator=(SmallVector&& o) noexcept {
    if (this != &o) { release(); cap_ = N; size_ = 0; steal(o); }
    return *this;
  }
  SmallVector& operator=(std::initializer_list<T> xs) { size_ = 0; append(xs.begin(), xs.size()); return *this; }
  SmallVector& operator=(const std::vector<T>& v) { size_ = 0; append(v.data(), v.size()); return *this; }

  operator std::vector<T>() const { return std::vector<T>(begin(), end()); }  // NOLINT: drop-in

  size_t size() const { return size_; }
  bool empty() const { return size_ == 0; }
  size_t capacity() const { return cap_; }
  T* data() { return cap_ > N ? heap_ : inline_; }
  const T* data() const { return cap_ > N ? heap_ : inline_; }
  T& operator[](size_t i) { return data()[i]; }
  const T& operator[](size_t i) const { return data()[i]; }
  T& at(size_t i) { check(i); return data()[i]; }
  const T& at(size_t i) const { check(i); return data()[i]; }
  T& front() { return data()[0]; }
  const T& front() const { return data()[0]; }
  T& back() { return data()[size_ - 1]; }
  const T& back() const { return data()[size_ - 1]; }

  iterator begin() { return data(); }
  iterator end() { return data() + size_; }
  const_iterator begin() const { return data(); }
  const_iterator end() const { return data() + size_; }
  const_iterator cbegin() const { return begin(); }
  const_iterator cend() const { return end(); }
  reverse_iterator rbegin() { return reverse_iterator(end()); }
  reverse_iterator rend() { return reverse_iterator(begin()); }
  const_reverse_iterator rbegin() const { return const_reverse_iterator(end()); }
  const_reverse_iterator rend() const { return const_reverse_iterator(begin()); }

  void reserve(size_t n) { if (n > cap_) grow(n); }
  void clear() { size_ = 0; }
  void push_back(const T& v) {
    if (size_ == cap_) { T copy = v; grow(size_ + 1); data()[size_++] = copy; return; }
    data()[size_++] = v;
  }
  template <typename... A>
  T& emplace_back(A&&... a) { push_back(T(std::forward<A>(a)...)); return back(); }
  void pop_back() { --size_; }
  void resize(size_t n) { resize(n, T{}); }
  void resize(size_t n, const T& v) {
    if (n > size_) { reserve(n); std::fill(data() + size_, data() + n, v); }
    size_ = static_cast<uint32_t>(n);
  }
  void assign(size_t n, const T& v) { size_ = 0; resize(n, v); }
  void assign(std::initializer_list<T> xs) { size_ = 0; append(xs.begin(), xs.size()); }
  template <typename It>
    requires(!std::is_integral_v<It>)
  void assign(It first, It last) {
    size_ = 0;
    for (; first != last; ++first) push_back(static_cast<T>(*first));
  }

  iterator insert(const_iterator pos, const T& v) { return insert(pos, size_t{1}, v); }
  iterator insert(const_iterator pos, size_t n, const T& v) {
    size_t i = static_cast<size_t>(pos - begin());
    T copy = v;
    open(i, n);
    std::fill(data() + i, data() + i + n, copy);
    return data() + i;
  }
  iterator insert(const_iterator pos, std::initializer_list<T> xs) {
    size_t i = static_cast<size_t>(pos - begin());
    open(i, xs.size());
    std::copy(xs.begin(), xs.end(), data() + i);
    return data() + i;
  }
  template <typename It>
    requires(!std::is_integral_v<It>)
  iterator insert(const_iterator pos, It first, It last) {
    size_t i = static_cast<size_t>(pos - begin());
    std::vector<T> xs(first, last);  // the range may alias this vector
    open(i, xs.size());
    std::copy(xs.begin(), xs.end(), data() + i);
    return data() + i;
  }
  iterator erase(const_iterator pos) { return erase(pos, pos + 1); }
  iterator erase(const_iterator first, const_iterator last) {
    T* d = data();
    size_t i = static_cast<size_t>(first - d), j = static_cast<size_t>(last - d);
    std::memmove(static_cast<void*>(d + i), d + j, (size_ - j) * sizeof(T));
    size_ -= static_cast<uint32_t>(j - i);
    return d + i;
  }
  void swap(SmallVector& o) noexcept { SmallVector t(std::move(o)); o = std::move(*this); *this = std::move(t); }

  friend bool operator==(const SmallVector& a, const SmallVector& b) {
    return a.size_ == b.size_ && std::equal(a.begin(), a.end(), b.begin());
  }
  friend bool operator==(const SmallVector& a, const std::vector<T>& b) {
    return a.size() == b.size() && std::equal(a.begin(), a.end(), b.begin());
  }
  friend auto operator<=>(const SmallVector& a, const SmallVector& b) {
    return std::lexicographical_compare_three_way(a.begin(), a.end(), b.begin(), b.end());
  }

 private:
  uint32_t size_ = 0;
  uint32_t cap_ = N;  // > N: the elements live in heap_
  union {
    T inline_[N] = {};  // zeroed: the fixed-size copies below read all N (issue 9)
    T* heap_;
  };

  void append(const T* p, size_t n) {
    reserve(size_ + n);
    if (n > 0) std::memcpy(static_cast<void*>(data() + size_), p, n * sizeof(T));
    size_ += static_cast<uint32_t>(n);
  }
  // Makes room for n elements at index i (shifting the tail).
  void open(size_t i, size_t n) {
    reserve(size_ + n);
    T* d = data();
    std::memmove(static_cast<void*>(d + i + n), d + i, (size_ - i) * sizeof(T));
    size_ += static_cast<uint32_t>(n);
  }
  void grow(size_t n) {
    size_t cap = std::max<size_t>(n, 2 * size_t{cap_});
    T* p = static_cast<T*>(std::malloc(cap * sizeof(T)));
    if (p == nullptr) throw std::bad_alloc();
    if (size_ > 0) std::memcpy(static_cast<void*>(p), data(), size_ * sizeof(T));
    release();
    heap_ = p;
    cap_ = static_cast<uint32_t>(cap);
  }
  // o's at most N elements: N copied whatever o's size (a fixed-size copy the compiler inlines,
  // where a copy of o.size_ elements is a call to memcpy: issue 9, copying ops into the graph).
  // Both sides hold room for N (inline, or a larger heap block).
  void copy_small(const SmallVector& o) {
    std::memcpy(static_cast<void*>(data()), o.data(), sizeof(inline_));
    size_ = o.size_;
  }
  void check(size_t i) const {
    if (i >= size_) throw std::out_of_range("SmallVector::at");
  }
  void release() {
    if (cap_ > N) std::free(heap_);
  }
  // Takes o's elements (its heap block, or a copy of its inline ones); o is left empty.
  void steal(SmallVector& o) {
    if (o.cap_ > N) {
      heap_ = o.heap_;
      cap_ = o.cap_;
      size_ = o.size_;
      o.cap_ = N;
    } else {
      std::memcpy(static_cast<void*>(inline_), o.inline_, sizeof(inline_));  // fixed size: no call
      size_ = o.size_;
    }
    o.size_ = 0;
  }
};

}  // namespace actsim::util
