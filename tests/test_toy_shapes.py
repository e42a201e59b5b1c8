import torch

from clq_triton.toy.shapes import (N_CLASSES, accuracy, classify, decode_label, encode_label,
                                   frechet_distance, image_features, make_images)


def test_labels_roundtrip():
    seen = set()
    for s in range(3):
        for c in range(4):
            for q in range(4):
                lab = encode_label(s, c, q)
                seen.add(decode_label(lab))
    assert len(seen) == N_CLASSES == 48


def test_checker_accuracy_on_held_out_real_images(gen):
    size = 32
    labels = torch.randint(0, N_CLASSES, (2000,), generator=gen)
    images = make_images(labels, size=size, generator=gen)
    assert images.shape == (2000, 3, size, size) and images.min() >= -1 and images.max() <= 1
    acc = accuracy(images, labels)
    print(f"checker accuracy on held-out real images: {acc}")
    assert acc["overall"] >= 0.95


def test_checker_rejects_wrong_and_empty_images(gen):
    labels = torch.randint(0, N_CLASSES, (200,), generator=gen)
    images = make_images(labels, generator=gen)
    assert accuracy(images, (labels + 4) % N_CLASSES)["overall"] < 0.05  # other colour
    assert (classify(-torch.ones(3, 3, 32, 32)) == -1).all()
    assert accuracy(torch.rand(200, 3, 32, 32, generator=gen) * 2 - 1, labels)["overall"] < 0.1


def test_frechet_distance_zero_for_same_and_grows_with_shift(gen):
    labels = torch.randint(0, N_CLASSES, (1000,), generator=gen)
    f1 = image_features(make_images(labels, generator=gen))
    f2 = image_features(make_images(labels, generator=gen))
    same = frechet_distance(f1, f1)
    assert abs(same) < 1e-6
    near = frechet_distance(f1, f2)
    noisy = frechet_distance(f1, image_features(make_images(labels, generator=gen)
                                                + 0.6 * torch.randn(1000, 3, 32, 32,
                                                                    generator=gen)))
    assert 0 <= near < noisy
