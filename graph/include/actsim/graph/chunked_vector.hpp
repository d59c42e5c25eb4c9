// actsim::graph::ChunkedVector — the graph's append-only arrays of ops, tensors and storages.
//
//   ChunkedVector<Op> ops;
//   Op& first = ops.push_back(op);   // stays valid while the array grows (builders hold references)
//   ops[i]; for (const Op& o : ops) ...;
//
// Elements live in chunks of kChunk and never move, as in a std::deque, but indexing is a shift and
// a mask and appending allocates once per chunk (libstdc++'s deque allocates a node per element
// larger than 512 bytes, which an Op is, and indexes through a map of nodes).
#pragma once

#include <compare>
#include <cstddef>
#include <iterator>
#include <memory>
#include <stdexcept>
#include <utility>
#include <vector>

namespace actsim::graph {

template <typename T>
class ChunkedVector {
  static constexpr size_t kShift = 8, kChunk = size_t{1} << kShift, kMask = kChunk - 1;

  template <bool Const>
  class Iter {
   public:
    using iterator_category = std::random_access_iterator_tag;
    using iterator_concept = std::random_access_iterator_tag;
    using value_type = T;
    using difference_type = std::ptrdiff_t;
    using pointer = std::conditional_t<Const, const T*, T*>;
    using reference = std::conditional_t<Const, const T&, T&>;
    using Owner = std::conditional_t<Const, const ChunkedVector, ChunkedVector>;

    Iter() = default;
    Iter(Owner* v, size_t i) : v_(v), i_(i) {}
    operator Iter<true>() const { return Iter<true>(v_, i_); }  // NOLINT: iterator -> const_iterator

    reference operator*() const { return (*v_)[i_]; }
    pointer operator->() const { return &(*v_)[i_]; }
    reference operator[](difference_type n) const { return (*v_)[i_ + static_cast<size_t>(n)]; }
    Iter& operator++() { return ++i_, *this; }
    Iter operator++(int) { Iter t = *this; ++i_; return t; }
    Iter& operator--() { return --i_, *this; }
    Iter operator--(int) { Iter t = *this; --i_; return t; }
    Iter& operator+=(difference_type n) { return i_ += static_cast<size_t>(n), *this; }
    Iter& operator-=(difference_type n) { return i_ -= static_cast<size_t>(n), *this; }
    friend Iter operator+(Iter a, difference_type n) { return a += n; }
    friend Iter operator+(difference_type n, Iter a) { return a += n; }
    friend Iter operator-(Iter a, difference_type n) { return a -= n; }
    friend difference_type operator-(const Iter& a, const Iter& b) {
      return static_cast<difference_type>(a.i_) - static_cast<difference_type>(b.i_);
    }
    friend bool operator==(const Iter& a, const Iter& b) { return a.i_ == b.i_; }
    friend auto operator<=>(const Iter& a, const Iter& b) { return a.i_ <=> b.i_; }

   private:
    Owner* v_ = nullptr;
    size_t i_ = 0;
  };

 public:
  using value_type = T;
  using size_type = size_t;
  using difference_type = std::ptrdiff_t;
  using reference = T&;
  using const_reference = const T&;
  using iterator = Iter<false>;
  using const_iterator = Iter<true>;

  ChunkedVector() = default;
  ChunkedVector(const ChunkedVector& o) { append_all(o); }
  ChunkedVector(ChunkedVector&& o) noexcept : chunks_(std::move(o.chunks_)), size_(std::exchange(o.size_, 0)) {}
  ChunkedVector& operator=(const ChunkedVector& o) {
    if (this != &o) {
      clear();
      append_all(o);
    }
    return *this;
  }
  ChunkedVector& operator=(ChunkedVector&& o) noexcept {
    if (this != &o) {
      clear();
      chunks_ = std::move(o.chunks_);
      size_ = std::exchange(o.size_, 0);
    }
    return *this;
  }
  ~ChunkedVector() { clear(); }

  size_t size() const { return size_; }
  bool empty() const { return size_ == 0; }
  T& operator[](size_t i) { return chunks_[i >> kShift][i & kMask]; }
  const T& operator[](size_t i) const { return chunks_[i >> kShift][i & kMask]; }
  T& at(size_t i) { return check(i), (*this)[i]; }
  const T& at(size_t i) const { return check(i), (*this)[i]; }
  T& front() { return (*this)[0]; }
  const T& front() const { return (*this)[0]; }
  T& back() { return (*this)[size_ - 1]; }
  const T& back() const { return (*this)[size_ - 1]; }
  iterator begin() { return {this, 0}; }
  iterator end() { return {this, size_}; }
  const_iterator begin() const { return {this, 0}; }
  const_iterator end() const { return {this, size_}; }
  const_iterator cbegin() const { return begin(); }
  const_iterator cend() const { return end(); }

  template <typename... Args>
  T& emplace_back(Args&&... args) {
    if ((size_ >> kShift) == chunks_.size()) chunks_.push_back(std::allocator<T>().allocate(kChunk));
    T* p = &chunks_[size_ >> kShift][size_ & kMask];
    std::construct_at(p, std::forward<Args>(args)...);
    ++size_;
    return *p;
  }
  T& push_back(const T& x) { return emplace_back(x); }
  T& push_back(T&& x) { return emplace_back(std::move(x)); }

  void clear() {
    for (size_t i = 0; i < size_; ++i) std::destroy_at(&(*this)[i]);
    for (T* c : chunks_) std::allocator<T>().deallocate(c, kChunk);
    chunks_.clear();
    size_ = 0;
  }

 private:
  void check(size_t i) const {
    if (i >= size_) throw std::out_of_range("ChunkedVector::at");
  }
  void append_all(const ChunkedVector& o) {
    for (const T& x : o) emplace_back(x);
  }
  std::vector<T*> chunks_;  // each holds kChunk elements' storage; the first size_ are constructed
  size_t size_ = 0;
};

}  // namespace actsim::graph
